"""DeviceMesh composition of the transformers integration: context parallelism inside FSDP2 / HSDP / DDP.

Note [dp x cp gradients]
------------------------
With ``apply_ring_attention(model, mesh=mesh)`` and ``shard_inputs(..., mesh=mesh)`` over a mesh holding a ``cp``
dimension (the ring) and data-parallel dimensions (each data-parallel replica takes its own batch), rank ``r``'s
loss is ``L_r = (sum of its tokens' losses) / n``, with ``n`` the number of scored tokens of EVERY replica's batch
(``shard_inputs`` sums the count over the mesh's other dimensions). The ranks' losses sum to the mean over all
scored tokens, the loss of one process training on the whole batch, so its gradient is ``sum_r dL_r``: a SUM over
all ``N = mesh.size()`` ranks. Data-parallel wrappers AVERAGE over the ranks they reduce: FSDP2's ``fully_shard``
over the flattened ``dp x cp`` mesh, HSDP (``fully_shard`` over a 2-D replicate x shard mesh of all the ranks), DDP
over all the ranks all divide the sum by ``N``. The integration therefore multiplies the gradient of the loss by
``N`` (:func:`scale_gradient`: the loss's value is unchanged), and the wrapper's average is the sum, once, with no
arithmetic on the loss in the user's code. Its own gradient hooks (``reduce_gradients``) are off then: the wrapper
reduces.

What goes wrong, and is refused (ConfigError naming what to change): FSDP2 sharding over fewer ranks than the mesh
(``mesh["dp"]`` alone: the cp ranks' gradients would never be summed); the integration's hooks together with FSDP2
(``reduce_gradients=True``; hooks on parameters that ``fully_shard`` replaced would never run). Checked when
``apply_ring_attention`` runs if ``fully_shard`` came first, else at the first loss computed eagerly (a model
compiled whole, ``fullgraph=True``, runs no check there: apply the integration after ``fully_shard`` then).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, expected


def is_mesh(value: Any) -> bool:
    if value is None or not dist.is_available():
        return False
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(value, DeviceMesh)


def check_mesh(mesh: Any, group: Any) -> None:
    """``mesh=`` of the integration: a DeviceMesh, 1-D or with a ``cp`` dimension, not given with ``group``."""
    if not is_mesh(mesh):
        raise ConfigError(expected("mesh", "None or a torch.distributed DeviceMesh", type(mesh).__name__))
    if group is not None:
        raise ConfigError(expected("group", "None when mesh is given (the ring is mesh['cp'])", type(group).__name__))
    if mesh.ndim > 1 and "cp" not in (mesh.mesh_dim_names or ()):
        raise ConfigError(
            expected(
                "mesh",
                "a 1-D mesh, or one with a dimension named 'cp' (the ring) beside the data-parallel ones",
                f"a mesh with dimensions {mesh.mesh_dim_names}",
            )
        )


def data_parallel_dims(mesh: Any) -> list[str]:
    """The mesh's dimensions other than ``cp`` (none for a 1-D mesh)."""
    if mesh.ndim == 1:
        return []
    return [name for name in mesh.mesh_dim_names if name != "cp"]


def ranks(mesh: Any) -> list[int]:
    return sorted(mesh.mesh.flatten().tolist())


def count_over_replicas(count: torch.Tensor, mesh: Any, device: torch.device) -> torch.Tensor:
    """``count`` (this replica's scored tokens) summed over the mesh's data-parallel dimensions."""
    total = count.to(device)
    for name in data_parallel_dims(mesh):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group(name))
    return total.to(count.device)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` (Note [dp x cp gradients])."""
    return x if factor == 1 else _ScaleGradient.apply(x, factor)


def _fsdp_reduction(module: Any) -> tuple[int, list[int]] | None:
    """``(ranks averaged over, ranks of this rank's reduce groups)`` of an FSDP2 module's gradients (its shard and,
    for HSDP, replicate process groups), None when it holds no parameters or FSDP2's state is not readable."""
    try:
        group = module._get_fsdp_state()._fsdp_param_group
        info = group.mesh_info if group is not None else None
    except AttributeError:  # FSDP2 internals moved: nothing to check against
        return None
    if info is None:
        return None
    size, members = 1, set()
    for attr in ("shard_process_group", "replicate_process_group"):
        pg = getattr(info, attr, None)
        if pg is not None:
            size *= dist.get_world_size(pg)
            members.update(dist.get_process_group_ranks(pg))
    return size, sorted(members)


def check_composition(model: Any, mesh: Any, reduce_gradients: bool) -> None:
    """Refuse FSDP2 compositions that would give wrong gradients (Note [dp x cp gradients]). FSDP2 modules are found
    by type (``fully_shard`` swaps a module's parameters between sharded and unsharded ones inside a forward, so
    their types tell nothing there)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        return
    if reduce_gradients:
        raise ConfigError(
            expected(
                "reduce_gradients",
                "False under FSDP2 (fully_shard reduces the gradients): pass apply_ring_attention(model, mesh=mesh) "
                "with the dp x cp mesh FSDP shards over, and leave reduce_gradients unset",
                True,
            )
        )
    if mesh is None:
        return  # a group and reduce_gradients=False: the caller scales (module docstring, Composition)
    want = ranks(mesh)
    for module in sharded:
        reduction = _fsdp_reduction(module)
        if reduction is None:
            continue
        size, members = reduction
        if size != len(want) or not set(members) <= set(want):
            raise ConfigError(
                expected(
                    "mesh",
                    f"fully_shard to reduce the gradients over every rank of the mesh ({want}), the cp ranks "
                    "included: fully_shard(module, mesh=mesh['dp', 'cp']._flatten('dp_cp')), or HSDP over "
                    "mesh['dp', 'cp']",
                    f"fully_shard of {type(module).__name__} averaging over {size} ranks ({members})",
                )
            )
