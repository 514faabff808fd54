"""Integrations of ring attention with training frameworks, one module per framework.

``ringattn.integrations.transformers``: Hugging Face transformers models (needs ``pip install
'ringattn[transformers]'``). Nothing here is imported by ``import ringattn``.
"""
