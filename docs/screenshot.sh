#!/usr/bin/env bash
# Open the built site in a real browser: build it (strict), serve it on localhost, and take headless Chromium
# screenshots of the home page and one API page. Not part of CI (it needs Chromium: `apt-get install chromium`).
#
#   docs/screenshot.sh [OUT_DIR]      # default: site-shots/ (git-ignored); prints the PNG paths
#
# Uses the `mkdocs` and `python` on PATH (an environment with `pip install -e '.[docs]'`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-site-shots}")
mkdir -p "$out"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then echo "no Chromium on PATH (apt-get install chromium)"; exit 1; fi

site=$(mktemp -d)/site
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m http.server "$port" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"' EXIT
for _ in $(seq 50); do python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
    2>/dev/null && break; sleep 0.1; done

shoot() {  # shoot PAGE NAME HEIGHT
    # --no-sandbox: Chromium refuses to run as root without it (containers, CI machines).
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="1400,$3" \
        --virtual-time-budget=5000 --screenshot="$out/$2.png" "http://127.0.0.1:$port/$1" >/dev/null 2>&1
    echo "$out/$2.png"
}
shoot "" home 1100
shoot "reference/ring/" api-ring 1600
shoot "ring/" guide-ring 2400
