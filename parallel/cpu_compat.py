"""The one place where megatron-core is adapted to run without CUDA (torch CPU build, gloo).

megatron-core assumes a GPU in a handful of spots. Each :class:`Shim` below replaces exactly one of
them, says why, and is applied only when CUDA is absent (``apply_cpu_shims()`` is a no-op on a GPU
machine unless forced). Every shim has a test in tests/test_cpu_compat*.py that shows what breaks
without it. No other module in this project patches third-party code.

Nothing here communicates; shims that touch collectives keep megatron's communication pattern and
only change the device or the argument types gloo accepts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_MARK = "_timeexpert_cpu_shim"


@dataclass(frozen=True)
class Shim:
    """One adaptation: ``name`` to log, ``why`` megatron needs it on CPU, ``apply`` to install it
    (returns False when it was already installed)."""

    name: str
    why: str
    apply: Callable[[], bool]


def _mark(obj: object, name: str) -> bool:
    """Record on ``obj`` that shim ``name`` is installed; False if it already was (idempotence)."""
    done = getattr(obj, _MARK, set())
    if name in done:
        return False
    setattr(obj, _MARK, done | {name})
    return True


# --- shim: RNG tracker -------------------------------------------------------------------------


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's named RNG streams (data-parallel, model-parallel, expert) on the CPU generator.

        megatron forks a named CUDA generator state around weight init and dropout so that e.g.
        TP ranks draw different dropout masks; here the same streams live on torch's CPU generator.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _shim_rng_tracker() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    if not _mark(mrandom, "rng_tracker"):
        return False
    mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    # A tracker built before the shim would still call torch.cuda: force a rebuild.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    return True


# --- shim: torch.cuda inside selected megatron modules --------------------------------------------


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: on CPU every op is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # wait_stream, wait_event, record_event, record, synchronize, query, ...: no-ops on CPU.
        return lambda *args, **kwargs: True if name == "query" else None


class _CpuCuda:
    """What ``torch.cuda`` looks like to a patched megatron module: the current device is the CPU,
    streams and events are no-ops, synchronize does nothing; anything else falls through."""

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_FACTORIES = frozenset(
    {"tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "randn", "rand"}
)


def _cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, an int, a torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by a patched megatron module: ``torch.cuda`` is the CPU view above and
    tensor factories asked for ``device="cuda"`` build on the CPU; everything else is torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        return _cpu_factory(attr) if name in _FACTORIES else attr


def _patch_module_torch(module_name: str, shim_name: str) -> bool:
    """Rebind the name ``torch`` inside ``module_name`` to the CPU view; nothing else changes."""
    module = importlib.import_module(module_name)
    if not _mark(module, shim_name):
        return False
    module.torch = _CpuTorch()
    return True


def _module_torch_shim(shim_name: str, module_name: str, why: str) -> Shim:
    return Shim(shim_name, why, functools.partial(_patch_module_torch, module_name, shim_name))


def _shim_te_general_gemm() -> bool:
    module = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not _mark(module, "router_gemm_without_te") or hasattr(module, "te_general_gemm"):
        return False
    module.te_general_gemm = None  # megatron then falls back to torch.matmul
    return True


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip-by-total-norm without its 'torch.cuda.FloatTensor' assertion: same maths,
    the gradients are scaled in place by max_norm / (total_norm + 1e-6) when that is below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _shim_clip_grads() -> bool:
    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    optim = importlib.import_module("megatron.core.optimizer.optimizer")
    if not _mark(clip, "clip_grads_cpu"):
        return False
    clip.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optim.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    return True


# --- shims: parameter type checks of megatron's mixed-precision and distributed optimizers ---------

_CPU_TO_CUDA_TYPE_NAME = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _parameters_report_cuda_type_names():
    """While active, ``param.type()`` (no arguments) of a CPU ``nn.Parameter`` returns the name of
    the CUDA tensor type of the same dtype ('torch.FloatTensor' -> 'torch.cuda.FloatTensor').
    ``type(dtype)`` conversions, plain tensors and everything after the block are untouched."""
    cls = torch.nn.Parameter
    own = cls.__dict__.get("type")

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not non_blocking and not kwargs:
            name = torch.Tensor.type(self)
            return _CPU_TO_CUDA_TYPE_NAME.get(name, name)
        return torch.Tensor.type(self, dtype, non_blocking, **kwargs)

    cls.type = type_name
    try:
        yield
    finally:
        if own is None:
            del cls.type
        else:
            cls.type = own


def _shim_optimizer_param_types(module_name: str, class_name: str, shim_name: str) -> bool:
    """Run ``class_name.__init__`` with CPU parameters reporting CUDA type names: megatron sorts
    parameters into bf16/fp16 (gets an fp32 main copy) and fp32 (is its own main weight) by
    comparing ``param.type()`` with 'torch.cuda.*Tensor' names; the sorting logic is unchanged."""
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    if not _mark(cls, shim_name):
        return False
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        with _parameters_report_cuda_type_names():
            original(self, *args, **kwargs)

    cls.__init__ = __init__
    return True


def _shim_distrib_optimizer_adam_step() -> bool:
    """Give each parameter its own torch Adam ``step`` when a DistributedOptimizer checkpoint loads.

    Without transformer-engine or apex (always the case on CPU) the inner optimizer is torch's Adam,
    whose per-parameter state holds a ``step`` tensor next to the moments. megatron's load (1) puts
    ONE step tensor, restored from the checkpoint's param groups, into every parameter's state,
    and torch's Adam increments each parameter's step in place, so after a resume the shared step
    advances once per parameter per optimizer step (wrong bias correction from the first step on);
    (2) then copies the loaded tensors into every state key, and the tensors of the 'fully_reshardable'
    and 'fully_sharded_model_space' formats have no ``step`` (KeyError: 'step'). Before megatron's
    copy, the wrapper gives the parameter a private copy of the restored step and passes it as its
    own source; everything else is megatron's."""
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = module.DistributedOptimizer
    if not _mark(cls, "distrib_optimizer_adam_step"):
        return False
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    return True


# --- shim: activation recomputation's CUDA RNG state -------------------------------------------------


def _shim_recompute_rng_states() -> bool:
    """Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA
    generator's state around the recomputed forward, beside the CPU generator and the tracker's
    named streams. Without CUDA there is no CUDA generator: every random draw of a CPU run comes from
    the CPU generator and the (CPU) tracker, which it already saves and restores, so the CUDA part is
    an empty placeholder and restoring it does nothing."""
    module = importlib.import_module("megatron.core.tensor_parallel.random")
    if not _mark(module, "recompute_rng_states"):
        return False
    module._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    module._set_cuda_rng_state = lambda *args, **kwargs: None
    return True


# --- shim: megatron's all-to-all MoE token dispatcher (added with the MoE layer benchmark) ----------


class _CpuEventStream(_NullStream):
    """A no-op side stream whose ``record_event`` returns a (no-op) event instead of None."""

    def record_event(self, *args, **kwargs):
        return _NullStream()


def _shim_moe_alltoall_dispatcher() -> bool:
    """The alltoall dispatcher creates a torch.cuda.Stream for its device-to-host copies and later
    synchronizes on the event that stream records; give it the CPU torch and an eventful stream."""
    module = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    if not _mark(module, "moe_alltoall_dispatcher"):
        return False
    module.torch = _CpuTorch()
    module.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CpuEventStream()
    return True


def _as_split_list(splits):
    """Split sizes as a list of Python ints (gloo's binding rejects tensors and numpy arrays)."""
    return None if splits is None else [int(n) for n in splits]


def _shim_moe_a2a_split_lists() -> bool:
    """The alltoall dispatcher passes its split sizes to all_to_all as tensors; convert them to lists."""
    module = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    if not _mark(module, "moe_a2a_split_lists"):
        return False
    original = module.all_to_all

    @functools.wraps(original)
    def all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None):
        return original(group, input_, _as_split_list(output_split_sizes_), _as_split_list(input_split_sizes))

    module.all_to_all = all_to_all
    return True


SHIMS: tuple[Shim, ...] = (
    Shim(
        "rng_tracker",
        "model_parallel_cuda_manual_seed and every TP/expert weight init fork torch.cuda RNG states "
        "(torch.cuda.get_rng_state raises 'Torch not compiled with CUDA enabled')",
        _shim_rng_tracker,
    ),
    _module_torch_shim(
        "ddp_buffer_device",
        "megatron.core.distributed.param_and_grad_buffer",
        "DDP allocates its contiguous param/grad buffers on torch.cuda.current_device()",
    ),
    _module_torch_shim(
        "optimizer_cuda_tensors",
        "megatron.core.optimizer.optimizer",
        "the fp32 optimizer keeps its loss scale as torch.tensor(..., device='cuda')",
    ),
    _module_torch_shim(
        "schedules_cuda_tensors",
        "megatron.core.pipeline_parallel.schedules",
        "the pipeline schedules count tokens in torch.zeros(..., device='cuda') and read torch.cuda streams",
    ),
    _module_torch_shim(
        "p2p_cuda_device",
        "megatron.core.pipeline_parallel.p2p_communication",
        "pipeline send/recv buffers are allocated on torch.cuda.current_device() and synchronized with torch.cuda",
    ),
    _module_torch_shim(
        "global_buffer_device",
        "megatron.core.utils",
        "the global memory buffer behind sequence-parallel all-gathers is allocated on torch.cuda.current_device()",
    ),
    _module_torch_shim(
        "tp_mappings_device",
        "megatron.core.tensor_parallel.mappings",
        "tensor/sequence-parallel gather and scatter outputs are allocated on torch.cuda.current_device()",
    ),
    _module_torch_shim(
        "causal_mask_device",
        "megatron.core.transformer.utils",
        "the default causal attention mask is built with torch.ones(..., device='cuda')",
    ),
    _module_torch_shim(
        "moe_router_device",
        "megatron.core.transformer.moe.router",
        "megatron's top-k router moves its gate weight to torch.cuda.current_device() on every forward",
    ),
    _module_torch_shim(
        "moe_utils_device",
        "megatron.core.transformer.moe.moe_utils",
        "megatron's MoE metric logging (track_moe_metrics) pre-creates per-layer aux-loss values with "
        "torch.zeros(..., device='cuda'); our trainer does not call it, user code built on megatron's may",
    ),
    _module_torch_shim(
        "tp_layers_device",
        "megatron.core.tensor_parallel.layers",
        "the sequence-parallel linear backward all-gathers into torch.empty(..., device=torch.cuda.current_device())",
    ),
    _module_torch_shim(
        "clip_grads_device",
        "megatron.core.optimizer.clip_grads",
        "the gradient-norm and clipping helpers allocate their buffers with device='cuda'",
    ),
    Shim(
        "clip_grads_cpu",
        "clip_grad_by_total_norm_fp32 asserts every gradient is a 'torch.cuda.FloatTensor'",
        _shim_clip_grads,
    ),
    _module_torch_shim(
        "checkpoint_writer_sync",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "the checkpoint writer calls torch.cuda.synchronize() before copying shards to the host",
    ),
    _module_torch_shim(
        "checkpoint_finalize_device",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "finishing a checkpoint save all-reduces its failure flag in a tensor on torch.cuda.current_device()",
    ),
    Shim(
        "float16_optimizer_param_types",
        "Float16OptimizerWithFloat16Params (training.precision=bf16) accepts only parameters whose "
        "type() is 'torch.cuda.{Float,Half,BFloat16}Tensor' (TypeError: Wrapped parameters must be one of ...)",
        functools.partial(
            _shim_optimizer_param_types,
            "megatron.core.optimizer.optimizer",
            "Float16OptimizerWithFloat16Params",
            "float16_optimizer_param_types",
        ),
    ),
    Shim(
        "distrib_optimizer_param_types",
        "DistributedOptimizer._build_model_and_main_param_groups accepts only parameters whose type() is "
        "'torch.cuda.{Float,Half,BFloat16}Tensor' (TypeError: Wrapped parameters must be one of ...)",
        functools.partial(
            _shim_optimizer_param_types,
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer",
            "distrib_optimizer_param_types",
        ),
    ),
    Shim(
        "distrib_optimizer_adam_step",
        "loading a DistributedOptimizer checkpoint with torch's Adam (no transformer-engine/apex) copies "
        "the loaded tensors into every Adam state key, 'step' is not among them (KeyError: 'step'), and "
        "it shares one step tensor between all parameters, which torch's Adam increments once per parameter",
        _shim_distrib_optimizer_adam_step,
    ),
    Shim(
        "router_gemm_without_te",
        "megatron's router gating reads the name te_general_gemm, which is only defined when "
        "transformer-engine imports (NameError without it)",
        _shim_te_general_gemm,
    ),
    Shim(
        "recompute_rng_states",
        "activation recomputation (tensor_parallel.checkpoint, training.recompute=full|selective) saves "
        "the CUDA generator state with torch.cuda.get_rng_state (AssertionError: Torch not compiled with CUDA enabled)",
        _shim_recompute_rng_states,
    ),
    Shim(
        "moe_alltoall_dispatcher",
        "MoEAlltoAllTokenDispatcher builds a torch.cuda.Stream at construction (RuntimeError without CUDA) and "
        "synchronizes on the event it records after moving split sizes to the host",
        _shim_moe_alltoall_dispatcher,
    ),
    Shim(
        "moe_a2a_split_lists",
        "MoEAlltoAllTokenDispatcher hands all_to_all its split sizes as tensors, which gloo's "
        "all_to_all_single rejects (TypeError: incompatible function arguments)",
        _shim_moe_a2a_split_lists,
    ),
)


def apply_cpu_shims(force: bool = False) -> list[str]:
    """Install every shim when CUDA is absent (or ``force``); return the names installed now.

    Idempotent: a second call installs nothing. Logs one line naming the shims, or that none were
    needed because CUDA is present.
    """
    if torch.cuda.is_available() and not force:
        log.info("CUDA present: megatron-core runs unpatched (no CPU shims)")
        return []
    installed = [shim.name for shim in SHIMS if shim.apply()]
    if installed:
        log.info("CUDA absent: applied megatron-core CPU shims: %s", ", ".join(installed))
    return installed
