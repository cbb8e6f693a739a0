"""The expert host's training backend: a hivemind ``ModuleBackend`` with mixed precision, dynamic loss scaling,
gradient accumulation and ZeRO-Offload style CPU optimizer offload.

hivemind's Runtime calls :meth:`ExpertBackend.forward` and :meth:`ExpertBackend.backward` from its own thread with
flat tuples of tensors; every backward call trains the expert (Learning@Home semantics), here with
``accumulation`` backward calls per optimizer step.

Precision modes (``precision``, ``offload``):

- ``fp32``: plain fp32 weights and compute.
- ``bf16``: autocast bf16 inside forward/backward, fp32 weights (the weights are the master copy). No loss scaling:
  bf16 has fp32's exponent range.
- ``fp16``: autocast fp16, fp32 master weights, dynamic loss scaling (:class:`DynamicLossScaler`).
- ``offload=True``: the fp32 master weights, their gradients and the AdamW state live in host (CPU) memory,
  pinned when the device is CUDA; the module on the device holds only a working copy in the compute dtype
  (fp16/bf16; fp32 when ``precision='fp32'``). After each backward the working-copy gradients go device->host,
  AdamW runs on the host master copy and the updated weights go host->device, on a side CUDA stream with an event
  that the next forward/backward waits for (so one expert's copy overlaps other experts' compute).

Because autocast casts fp32 weights to the compute dtype with the same round-to-nearest that offload uses to build
its half working copy, offload and non-offload runs of the same precision compute the same numbers: on CPU they
are bitwise equal (tests/test_backend.py checks it).

Expert I/O is always in the dtype of the input schema (fp32 by default) whatever the internal precision, so
trainers never see which precision a host chose.
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.nested import nested_compare, nested_flatten, nested_map, nested_pack
from hivemind.utils.tensor_descr import DUMMY_BATCH_SIZE, BatchTensorDescriptor

from athome.config import OptimizerConfig
from athome.numerics import finite_flag

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
COMPUTE_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAM_EPS = 1e-8
STATE_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A saved expert state that does not fit this expert (other parameter names or shapes)."""


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 (the rule of ``torch.amp.GradScaler``, with a floor and a ceiling).

    ``update(found_inf=True)`` multiplies the scale by ``backoff_factor`` (not below ``min_scale``) and restarts the
    clean-step count; after ``growth_interval`` consecutive ``update(found_inf=False)`` calls the scale is multiplied
    by ``growth_factor`` (not above ``max_scale``). When disabled, the scale is 1.0 and ``update`` does nothing.
    Scales stay powers of two (with the default factors), so scaling and unscaling are exact.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ):
        assert growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1 and 0 < min_scale <= max_scale
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.min_scale, self.max_scale = min_scale, max_scale
        self._scale = min(max(float(init_scale), min_scale), max_scale) if enabled else 1.0
        self.clean_steps = 0  # consecutive update(found_inf=False) calls since the last change of scale

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self._scale = min(self._scale * self.growth_factor, self.max_scale)
                self.clean_steps = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(enabled=self.enabled, scale=self._scale, clean_steps=self.clean_steps)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if bool(state["enabled"]) != self.enabled:
            # e.g. an fp16 checkpoint loaded into a bf16 host: keep this host's own scaling rule
            logger.info(f"loss scaler state from a run with enabled={state['enabled']} ignored")
            return
        self._scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


class ExpertBackend(ModuleBackend):
    """A hivemind ``ModuleBackend`` that trains its expert with AdamW, mixed precision and optional CPU offload.

    :param name: expert uid, e.g. ``ffn.0.3``
    :param module: the expert; it is moved to ``device`` (and, with ``offload``, cast to the compute dtype)
    :param optimizer_config: AdamW hyperparameters (``expert_lr``, ``betas``, ``weight_decay``), ``grad_clip``
      (max global grad norm per optimizer step) and ``expert_accumulation``
    :param precision: ``fp32``, ``bf16`` or ``fp16`` (see the module docstring)
    :param device: compute device; defaults to CPU. Pass the same device (or None) as ``Runtime(device=...)``.
    :param offload: keep fp32 master weights and AdamW state in host memory, a compute-dtype copy on the device
    :param accumulation: backward calls per optimizer step (default: ``optimizer_config.expert_accumulation``).
      The step uses the mean of the accumulated per-call gradients; calls whose gradients overflow do not count.
    :param loss_scale_init / loss_scale_growth_interval / loss_scale_min: fp16 dynamic loss scaling parameters
    :param overflow_retries: fp16 only: how many times an overflowed backward is recomputed (input gradients only)
      at ever lower scales so that the caller still gets finite input gradients; if all overflow, zeros are
      returned with a warning
    :param pool_kwargs: ``max_batch_size``, ``min_batch_size`` etc., passed on to hivemind's TaskPool

    Counters (read them from any thread): ``num_updates``, ``num_backward_calls``, ``num_forward_calls``,
    ``samples_processed`` (samples of backward calls whose gradients were used), ``skipped_steps`` (backward calls
    whose gradients were discarded as non-finite), ``loss_scale``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        *,
        optimizer_config: OptimizerConfig,
        precision: Precision = "fp32",
        device: Optional[torch.device | str] = None,
        offload: bool = False,
        args_schema: Tuple[BatchTensorDescriptor, ...],
        kwargs_schema: Optional[Dict[str, BatchTensorDescriptor]] = None,
        outputs_schema: Any = None,
        accumulation: Optional[int] = None,
        loss_scale_init: float = 2.0**16,
        loss_scale_growth_interval: int = 2000,
        loss_scale_min: float = 1.0,
        overflow_retries: int = 3,
        **pool_kwargs,
    ):
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {precision!r}")
        self.precision: str = precision
        self.compute_dtype = COMPUTE_DTYPES[precision]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # so tensor.device == self.device
        self.offload = offload
        self.accumulation = int(accumulation if accumulation is not None else optimizer_config.expert_accumulation)
        assert self.accumulation >= 1
        self.grad_clip = float(optimizer_config.grad_clip)
        self.overflow_retries = int(overflow_retries)
        self._cuda = self.device.type == "cuda"
        self._autocast_enabled = precision != "fp32"

        with torch.no_grad():
            named = list(module.named_parameters())
            if offload:
                # the fp32 master copy is taken BEFORE casting the module to the compute dtype: no precision lost
                pin = self._cuda and torch.cuda.is_available()
                self._master: List[torch.Tensor] = [
                    _host_copy(p.detach(), torch.float32, pin=pin) for _, p in named
                ]
                module.to(device=self.device, dtype=self.compute_dtype)
            else:
                module.to(device=self.device)
                # the module's own fp32 params are the master weights
                self._master = [p for _, p in module.named_parameters()]
        self.parameter_names: List[str] = [n for n, _ in named]
        self._working: List[nn.Parameter] = [p for _, p in module.named_parameters()]
        self._trainable: List[int] = [i for i, p in enumerate(self._working) if p.requires_grad]
        for i, p in enumerate(self._master):
            if p.dtype != torch.float32:
                raise TypeError(f"{name}: parameter {self.parameter_names[i]} is {p.dtype}; expected fp32 weights")

        trainable_master = [self._master[i] for i in self._trainable]
        optimizer = torch.optim.AdamW(
            trainable_master,
            lr=optimizer_config.expert_lr,
            betas=tuple(optimizer_config.betas),
            eps=ADAM_EPS,
            weight_decay=optimizer_config.weight_decay,
            # one kernel over all tensors: 4x faster than the default per-tensor loop on a CPU (the offload host
            # step, and CPU experts), measured on 2 cores for an 8M-parameter expert: 11 vs 46 ms
            fused=True,
        )
        self.scaler = DynamicLossScaler(
            enabled=precision == "fp16",
            init_scale=loss_scale_init,
            growth_interval=loss_scale_growth_interval,
            min_scale=loss_scale_min,
        )

        # offload plumbing: pinned host buffers for device->host grads / host->device weights, a side stream, events
        self._grad_buffers: List[torch.Tensor] = []
        self._stage_buffers: List[torch.Tensor] = []
        self._copy_stream = None
        self._params_ready: Optional["torch.cuda.Event"] = None  # host->device weight copy done
        if offload and self._cuda:
            self._grad_buffers = [_host_empty_like(self._working[i], pin=True) for i in self._trainable]
            self._stage_buffers = [_host_empty_like(self._working[i], pin=True) for i in self._trainable]
            self._copy_stream = torch.cuda.Stream(device=self.device)

        self._io_dtype = next((d.dtype for d in args_schema if d.dtype is not None and d.dtype.is_floating_point),
                              torch.float32)
        self._lock = threading.RLock()  # guards parameters, optimizer, scaler and counters against state_dict()
        self._accumulated = 0  # backward calls whose gradients sit in the master .grad, waiting for a step

        self.num_updates = 0
        self.num_backward_calls = 0
        self.num_forward_calls = 0
        self.samples_processed = 0
        self.skipped_steps = 0

        if outputs_schema is None:
            # ModuleBackend would run the raw module on fp32 zeros, which fails on a half working copy
            self.module = module
            self.args_schema, self.kwargs_schema = tuple(args_schema), dict(kwargs_schema or {})
            dummy_args = [d.make_zeros(DUMMY_BATCH_SIZE).to(self.device) for d in self.args_schema]
            dummy_kwargs = {k: d.make_zeros(DUMMY_BATCH_SIZE).to(self.device) for k, d in self.kwargs_schema.items()}
            with torch.no_grad(), self._autocast():
                dummy_outputs = self._cast_outputs(module(*dummy_args, **dummy_kwargs))
            # described from CPU copies: clients must not be told to allocate on this host's device
            outputs_schema = nested_map(lambda t: BatchTensorDescriptor.from_tensor(t.cpu()), dummy_outputs)

        super().__init__(
            name,
            module,
            optimizer=optimizer,
            scheduler=None,
            args_schema=args_schema,
            kwargs_schema=kwargs_schema,
            outputs_schema=outputs_schema,
            **pool_kwargs,
        )

    # ------------------------------------------------------------------ public state

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def master_parameters(self) -> List[torch.Tensor]:
        """The fp32 master weights, in ``parameter_names`` order (the module's own params unless offloaded)."""
        return list(self._master)

    @property
    def master_lock(self) -> "_MasterWeightsLock":
        """Hold this while reading or changing ``master_parameters`` from another thread (replica averaging).

        Training steps wait meanwhile; on release, an offloaded expert's device copy is refreshed from the master.
        """
        return _MasterWeightsLock(self)

    def device_memory_bytes(self) -> int:
        """Bytes of the tensors this expert keeps on its compute device between requests.

        Counts the module's parameters and buffers, one gradient per trainable parameter (in the parameter's
        dtype: every backward materialises it, even if it is freed after the step) and optimizer state stored on
        the device. With ``offload`` the fp32 master copy, its gradients and the AdamW state are host-side by
        construction and are not counted, even when the compute device is itself the CPU. Activations are
        transient and not counted (on CUDA, measure them with ``torch.cuda.max_memory_allocated``).
        """
        seen: set = set()
        total = 0

        def count(t: Optional[torch.Tensor]) -> None:
            nonlocal total
            if t is None:
                return
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                return
            seen.add(storage.data_ptr())
            total += storage.nbytes()

        for p in self._working:
            count(p)
        for b in self.module.buffers():
            count(b)
        total += sum(self._working[i].numel() * self._working[i].element_size() for i in self._trainable)
        if not self.offload:
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.device == self.device:
                        count(value)
        return total

    def host_memory_bytes(self) -> int:
        """Bytes of the offloaded fp32 master weights, their gradients and the AdamW state (0 without offload)."""
        if not self.offload:
            return 0
        total = sum(2 * self._master[i].numel() * 4 for i in self._trainable)  # weights + grads
        total += sum(p.numel() * 4 for i, p in enumerate(self._master) if i not in self._trainable)
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        total += sum(b.numel() * b.element_size() for b in self._grad_buffers + self._stage_buffers)
        return total

    # ------------------------------------------------------------------ runtime entry points

    def forward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Outputs for an aggregated batch (flat tensors per ``forward_schema``), in the schema's dtype."""
        args, kwargs = nested_pack(inputs, structure=self.forward_schema)
        if args[0].shape[0] == 0:
            raise RuntimeError("Batch should contain more than 0 samples")
        args, kwargs = self._to_device(args, kwargs)
        self._wait_for_params()
        with torch.no_grad(), self._autocast():
            outputs = self._cast_outputs(self.module(*args, **kwargs))
        self.num_forward_calls += 1
        return tuple(nested_flatten(outputs))

    def backward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Gradients w.r.t. the inputs for an aggregated batch; also trains the expert (see class docstring).

        Receives flat tensors per ``backward_schema`` (inputs, then grad_outputs); recomputes the forward pass.
        The returned input gradients are unscaled, in the inputs' dtype, and always finite when the caller's
        grad_outputs are finite (see ``overflow_retries``).
        """
        (args, kwargs), grad_outputs = nested_pack(inputs, structure=self.backward_schema)
        batch_size = args[0].shape[0]
        args, kwargs = self._to_device(args, kwargs)
        grad_outputs = nested_map(lambda g: g.to(self.device, non_blocking=True), grad_outputs)

        with self._lock:
            self.num_backward_calls += 1
            self._wait_for_params()
            if not _all_finite(list(nested_flatten(grad_outputs))):
                # the caller's fault, not an fp16 overflow: do not lower everybody's loss scale for it
                logger.warning(f"{self.name}: non-finite grad_outputs, update skipped, returning zero input grads")
                self.skipped_steps += 1
                return self._zero_grad_inputs(args, kwargs)

            scale = self.scaler.scale
            grad_inputs, param_grads = self._compute_grads(args, kwargs, grad_outputs, scale, with_params=True)
            if _all_finite(grad_inputs + param_grads):  # checked on the device: no copies for an overflowed call
                if self.offload:
                    param_grads = self._grads_to_host(param_grads)  # fp32 on host, still scaled
                self.scaler.update(found_inf=False)
                self._accumulate(param_grads, 1.0 / scale)
                self.samples_processed += batch_size
                if self._accumulated >= self.accumulation:
                    self._step()
                return self._finish_grad_inputs(args, kwargs, grad_inputs, scale)

            # overflow (fp16) or garbage (fp32/bf16): skip this call's update, lower the scale, recover input grads
            del param_grads
            self.skipped_steps += 1
            self.scaler.update(found_inf=True)
            logger.debug(f"{self.name}: non-finite gradients at loss scale {scale}, update skipped")
            return self._recover_grad_inputs(args, kwargs, grad_outputs)

    def on_backward(self, batch_size: int) -> None:
        """Not used: :meth:`backward` updates the expert itself (accumulation, loss scaling, offload)."""

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> Dict[str, Any]:
        """A consistent snapshot, safe to take from another thread: fp32 master weights (``master``), floating
        and other buffers (``buffers``), AdamW state, loss-scaler state and counters; all tensors are CPU copies.
        Gradients accumulated towards an unfinished step are not included."""
        with self._lock:
            master = {n: p.detach().to("cpu", copy=True) for n, p in zip(self.parameter_names, self._master)}
            buffers = {n: b.detach().to("cpu", copy=True) for n, b in self.module.named_buffers()}
            optimizer_state = _clone_optimizer_state(self.optimizer.state_dict())
            return dict(
                format=STATE_FORMAT,
                uid=self.name,
                precision=self.precision,
                master=master,
                buffers=buffers,
                optimizer=optimizer_state,
                scaler=self.scaler.state_dict(),
                counters=self.counters(),
            )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`CheckpointMismatchError` if names or shapes differ."""
        master = state_dict["master"]
        expected = {n: tuple(p.shape) for n, p in zip(self.parameter_names, self._master)}
        got = {n: tuple(t.shape) for n, t in master.items()}
        problems = [f"missing {n}{list(s)}" for n, s in expected.items() if n not in got]
        problems += [f"unexpected {n}{list(s)}" for n, s in got.items() if n not in expected]
        problems += [
            f"{n}: checkpoint {list(got[n])} vs expert {list(s)}"
            for n, s in expected.items()
            if n in got and got[n] != s
        ]
        buffers = dict(self.module.named_buffers())
        for n, t in state_dict.get("buffers", {}).items():
            if n not in buffers or tuple(buffers[n].shape) != tuple(t.shape):
                problems.append(f"buffer {n}{list(t.shape)} does not fit")
        n_opt = len(state_dict["optimizer"]["param_groups"][0]["params"]) if "optimizer" in state_dict else None
        if n_opt is not None and n_opt != len(self._trainable):
            problems.append(f"optimizer state for {n_opt} parameters, expert trains {len(self._trainable)}")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint of {state_dict.get('uid', '?')} does not fit expert {self.name}: " + "; ".join(problems)
            )

        with self._lock, torch.no_grad():
            self._wait_for_params(host=True)
            for n, p in zip(self.parameter_names, self._master):
                p.copy_(master[n])
                p.grad = None
            for n, t in state_dict.get("buffers", {}).items():
                buffers[n].copy_(t)
            if "optimizer" in state_dict:
                self.optimizer.load_state_dict(state_dict["optimizer"])
            else:
                logger.warning(f"{self.name}: checkpoint has no optimizer state, AdamW starts afresh")
            if "scaler" in state_dict:
                self.scaler.load_state_dict(state_dict["scaler"])
            for key, value in state_dict.get("counters", {}).items():
                if key in _COUNTERS:
                    setattr(self, key, int(value))
            self._accumulated = 0
            if self.offload:
                self._push_master_to_device(all_params=True)

    def counters(self) -> Dict[str, Any]:
        return dict(
            num_updates=self.num_updates,
            num_backward_calls=self.num_backward_calls,
            num_forward_calls=self.num_forward_calls,
            samples_processed=self.samples_processed,
            skipped_steps=self.skipped_steps,
            loss_scale=self.loss_scale,
        )

    # ------------------------------------------------------------------ internals

    def _autocast(self):
        # entered inside forward/backward: autocast state is thread-local and the Runtime has its own thread
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype, enabled=self._autocast_enabled)

    def _to_device(self, args, kwargs):
        args = [t.to(self.device, non_blocking=True) for t in args]
        kwargs = {k: t.to(self.device, non_blocking=True) for k, t in kwargs.items()}
        return args, kwargs

    def _cast_outputs(self, outputs):
        return nested_map(lambda t: t.to(self._io_dtype) if t.is_floating_point() else t, outputs)

    def _compute_grads(
        self, args, kwargs, grad_outputs, scale: float, with_params: bool
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Recompute forward, backprop ``scale * grad_outputs``; return (scaled input grads, scaled param grads).

        Input grads follow ``nested_flatten((args, kwargs))`` (zeros for non-float inputs); param grads follow
        ``self._trainable`` in the working parameters' dtype. Uses ``autograd.grad`` rather than ``.grad`` so
        that each call's gradients can be checked for overflow before they touch the accumulator.
        """
        with torch.enable_grad():
            args = [t.detach().requires_grad_(t.is_floating_point()) for t in args]
            kwargs = {k: t.detach().requires_grad_(t.is_floating_point()) for k, t in kwargs.items()}
            with self._autocast():
                outputs = self.module(*args, **kwargs)
            assert nested_compare(outputs, grad_outputs), "outputs and grad_outputs must have the same structure"
            outputs_flat = list(nested_flatten(outputs))
            # scale in fp32 *then* cast: an fp16 overflow of the scaled grad_outputs is an overflow like any other
            grads_flat = [
                (g.float() * scale if scale != 1.0 else g).to(dtype=out.dtype)
                for g, out in zip(nested_flatten(grad_outputs), outputs_flat)
            ]
            flat_inputs = list(nested_flatten((args, kwargs)))
            float_inputs = [t for t in flat_inputs if t.requires_grad]
            params = [self._working[i] for i in self._trainable] if with_params else []
            pairs = [(o, g) for o, g in zip(outputs_flat, grads_flat) if o.requires_grad]
            if pairs and (float_inputs or params):
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], float_inputs + params, [g for _, g in pairs], allow_unused=True
                )
            else:
                grads = [None] * (len(float_inputs) + len(params))
        input_grads_iter = iter(grads[: len(float_inputs)])
        grad_inputs = []
        for t in flat_inputs:
            g = next(input_grads_iter) if t.requires_grad else None
            grad_inputs.append(g if g is not None else torch.zeros_like(t))
        param_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[len(float_inputs):], params)]
        return grad_inputs, param_grads

    def _finish_grad_inputs(self, args, kwargs, grad_inputs: List[torch.Tensor], scale: float):
        flat_inputs = list(nested_flatten((args, kwargs)))
        if scale != 1.0:
            grad_inputs = [
                (g.float() * (1.0 / scale)).to(x.dtype) if x.is_floating_point() else g
                for g, x in zip(grad_inputs, flat_inputs)
            ]
        return tuple(grad_inputs)

    def _zero_grad_inputs(self, args, kwargs):
        return tuple(torch.zeros_like(t) for t in nested_flatten((args, kwargs)))

    def _recover_grad_inputs(self, args, kwargs, grad_outputs):
        """After an overflow, recompute input grads only, at the lowered scale, then 2^8 and 2^16 times lower..."""
        if self.scaler.enabled:
            for attempt in range(self.overflow_retries):
                scale = self.scaler.scale * 2.0 ** (-8 * attempt)
                grad_inputs, _ = self._compute_grads(args, kwargs, grad_outputs, scale, with_params=False)
                if _all_finite(grad_inputs):
                    return self._finish_grad_inputs(args, kwargs, grad_inputs, scale)
        logger.warning(f"{self.name}: input gradients are not finite even at reduced scale; returning zeros")
        return self._zero_grad_inputs(args, kwargs)

    def _grads_to_host(self, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """Working-copy grads (device, compute dtype) -> fp32 host tensors. On CUDA: non-blocking copies into
        pinned buffers on the side stream, then wait for them (the host step needs them next)."""
        if not self._cuda:
            return [g.float() for g in grads]
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # grads are produced on the compute stream
        with torch.cuda.stream(stream):
            for buffer, g in zip(self._grad_buffers, grads):
                buffer.copy_(g, non_blocking=True)
                g.record_stream(stream)  # keep the allocator from reusing g's memory before the copy is done
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        return [b.float() for b in self._grad_buffers]

    def _accumulate(self, grads: List[torch.Tensor], inv_scale: float) -> None:
        """Add this call's unscaled fp32 grads to the master ``.grad`` (same op sequence with and without offload,
        so both give bitwise-equal results)."""
        for i, g in zip(self._trainable, grads):
            master = self._master[i]
            g = g.to(dtype=torch.float32, device=master.device)
            if inv_scale != 1.0:
                g = g * inv_scale
            if master.grad is None:
                master.grad = g  # a fresh tensor from autograd / the host copy, never a view of the weights
            else:
                master.grad.add_(g)
        self._accumulated += 1

    def _step(self) -> None:
        """AdamW on the fp32 master weights with the mean accumulated gradient, clipped to ``grad_clip``."""
        trainable_master = [self._master[i] for i in self._trainable]
        with torch.no_grad():
            if self._accumulated > 1:
                for p in trainable_master:
                    p.grad.div_(self._accumulated)
            torch.nn.utils.clip_grad_norm_(trainable_master, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0
        self.num_updates += 1
        if self.offload:
            self._push_master_to_device()

    def _push_master_to_device(self, all_params: bool = False) -> None:
        """Copy updated master weights into the device working copy (rounding to the compute dtype)."""
        indices = range(len(self._master)) if all_params else self._trainable
        with torch.no_grad():
            if not self._cuda or all_params:
                for i in indices:
                    self._working[i].copy_(self._master[i])
                return
            if self._params_ready is not None:
                self._params_ready.synchronize()  # the previous copy may still read the staging buffers
            for stage, i in zip(self._stage_buffers, self._trainable):
                stage.copy_(self._master[i])  # fp32 -> compute dtype on the host, into pinned memory
            stream = self._copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # don't overwrite weights still being read
            with torch.cuda.stream(stream):
                for stage, i in zip(self._stage_buffers, self._trainable):
                    self._working[i].copy_(stage, non_blocking=True)
                self._params_ready = torch.cuda.Event()
                self._params_ready.record(stream)

    def _wait_for_params(self, host: bool = False) -> None:
        """Make the compute stream (or, with ``host``, this thread) wait for a pending host->device weight copy."""
        if self._params_ready is None:
            return
        if host:
            self._params_ready.synchronize()
        else:
            torch.cuda.current_stream(self.device).wait_event(self._params_ready)


_COUNTERS = ("num_updates", "num_backward_calls", "num_forward_calls", "samples_processed", "skipped_steps")


class _MasterWeightsLock:
    def __init__(self, backend: "ExpertBackend"):
        self.backend = backend

    def __enter__(self) -> None:
        self.backend._lock.acquire()

    def __exit__(self, *exc) -> None:
        try:
            if self.backend.offload:
                self.backend._push_master_to_device(all_params=True)
        finally:
            self.backend._lock.release()


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    flags_by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            flags_by_device.setdefault(t.device, []).append(finite_flag(t))
    # one host sync per device rather than one per tensor
    return all(bool(torch.stack(flags).all()) for flags in flags_by_device.values())


def _host_copy(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=pin)
    out.copy_(t)
    return out


def _host_empty_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


def _clone_optimizer_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """optimizer.state_dict() references live tensors: copy them to CPU so the snapshot stays consistent."""
    return dict(
        state={
            k: {name: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                for name, v in s.items()}
            for k, s in state["state"].items()
        },
        param_groups=copy.deepcopy(state["param_groups"]),
    )
