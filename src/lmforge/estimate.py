"""Plan a run before launching it: parameters, FLOPs, memory per GPU, time, and which devices it fits.

Everything here is arithmetic on the config (no model is built), except `measure_step_peak`, which runs
one real forward/backward and reads the allocator's peak, to check the arithmetic against.

Memory model (bytes per GPU), N parameters, Nm of them in matmuls:
- weights: fp32 master copy 4N; with 16-bit autocast also the 2-byte copies of matmul weights that
  autocast makes in the forward pass and backward keeps (2Nm). FSDP: 4N/G plus gathered 16-bit units.
- gradients: fp32, 4N (DDP on more than one GPU keeps a second 4N in its all-reduce buckets). FSDP: 4N/G.
- optimizer: AdamW's two fp32 moments, 8N; 8-bit AdamW (bitsandbytes) one byte each, 2N; Muon one fp32
  momentum per block matrix, 4 bytes for each of their parameters and AdamW's 8 for the rest. FSDP: /G.
- activations: tensors autograd saves, counted op by op for this model (see `activation_bytes_per_token`).
- logits: fp32 logits, log-softmax and a gradient live together at the loss: 12 bytes per (token, vocab
  entry) (measured on CPU: the peak holds three such tensors).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .config import Config
from .errors import LmforgeError
from .model import ModelConfig, flops_per_token, param_breakdown

GIB = 1024**3
ASSUMED_MFU = 0.40  # model FLOPs utilisation assumed for predictions (nanoGPT-class runs reach 35-50%)
CUDA_OVERHEAD = int(1.0 * GIB)  # CUDA context + cuBLAS workspace + allocator slack (assumed, not measured)
HOST_OVERHEAD = int(0.5 * GIB)  # Python + torch libraries when training on CPU / MPS unified memory
LOGIT_BYTES = 12  # fp32 logits, log-softmax and one gradient live at once, per (token, vocab entry)


class EstimateError(LmforgeError, ValueError):
    """The config cannot be estimated as given (e.g. no vocabulary size)."""


@dataclass(frozen=True)
class Device:
    """A training device for the fit table: usable memory and dense 16-bit peak FLOP/s."""

    name: str
    memory: int  # bytes usable for training
    peak_flops: float  # bf16/fp16 dense with fp32 accumulation (datasheets); fp32 for a CPU
    kind: str = "cuda"  # cuda | mps | cpu
    multi_gpu: bool = True  # FSDP over several of them is a possible fix


def _cpu_device() -> Device:
    """This machine's RAM and a rough CPU peak (cores x 2.5 GHz x 32 fp32 FLOP/cycle for AVX2 FMA)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * GIB
    cores = os.cpu_count() or 1
    return Device(f"CPU RAM (this machine, {cores} cores)", ram, cores * 2.5e9 * 32, "cpu", False)


def devices() -> list[Device]:
    """The devices of the fit table (GeForce peaks are the fp32-accumulate figures of NVIDIA's whitepapers)."""
    return [
        Device("RTX 3060 12GB", 12 * GIB, 25.6e12),
        Device("RTX 4080 16GB", 16 * GIB, 97.5e12),
        Device("RTX 4090 24GB", 24 * GIB, 165.2e12),
        Device("A100 40GB", 40 * GIB, 312e12),
        Device("A100 80GB", 80 * GIB, 312e12),
        Device("H100 80GB", 80 * GIB, 989e12),
        # Metal lets the GPU use about 75% of unified memory; M2 Max-class GPU, ~13.6 TFLOP/s.
        Device("Apple M-series 32GB unified", 24 * GIB, 13.6e12, "mps", False),
        _cpu_device(),
    ]


def find_device(name: str) -> Device:
    """A device of the table by a loose name (`4090`, `a100-80`, `h100`); one line naming the choices."""
    key = name.lower().replace("-", " ").replace("_", " ")
    table = devices()
    for d in table:
        if key in d.name.lower() or key.replace(" ", "") in d.name.lower().replace(" ", ""):
            return d
    names = ", ".join(d.name for d in table)
    raise EstimateError(f"--gpu {name!r} is not in the device table: choose one of {names}")


@dataclass(frozen=True)
class Setting:
    """The training settings the memory depends on."""

    micro_batch_size: int
    seq_len: int
    precision: str = "bf16"  # fp32 | bf16 | fp16
    optimizer: str = "adamw"  # adamw | adamw8bit | muon
    parallel: str = "ddp"  # ddp | fsdp
    gpus: int = 1
    checkpointing: str = "none"  # none | full | every_k
    checkpointing_k: int = 2
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def describe(self) -> str:
        """One line: the settings an estimate assumed."""
        ckpt = self.checkpointing if self.checkpointing != "every_k" else f"every {self.checkpointing_k}"
        par = f"{self.parallel} x{self.gpus}"
        if self.parallel == "fsdp":
            par += f" (reshard {'on' if self.reshard_after_forward else 'off'}"
            par += ", cpu offload)" if self.cpu_offload else ")"
        return (
            f"micro-batch {self.micro_batch_size} x {self.seq_len} tokens, {self.precision}, "
            f"{self.optimizer}, {par}, activation checkpointing {ckpt}"
        )


def setting_from_config(cfg: Config, gpus: int | None = None, precision: str | None = None) -> Setting:
    """The Setting a config asks for."""
    t = cfg.train
    mbs = t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1
    return Setting(
        micro_batch_size=mbs,
        seq_len=cfg.model.seq_len or cfg.model.context_len,
        precision=precision or (t.precision if t.precision != "auto" else "bf16"),
        optimizer=t.optimizer,
        parallel=t.parallel,
        gpus=gpus or 1,
        checkpointing=t.activation_checkpointing,
        checkpointing_k=t.activation_checkpointing_k,
        reshard_after_forward=cfg.fsdp.reshard_after_forward,
        cpu_offload=cfg.fsdp.cpu_offload,
    )


def activation_bytes_per_token(m: ModelConfig, precision: str) -> dict[str, int]:
    """Bytes autograd saves per token: per block, at a block boundary, and outside the blocks.

    Counted from what each op of model/gpt.py keeps for backward (Korthikanti et al., 2022, do the same
    for Megatron: 34 bytes x C per token in 16-bit for a GPT-2 block, without the attention scores, which
    fused SDPA kernels never store). Under autocast the residual stream and the norms stay fp32 (4 bytes);
    matmul inputs and outputs are 16-bit.
    """
    m = m.resolved()
    a = 4 if precision == "fp32" else 2  # bytes of a matmul input/output
    r = 4  # residual stream and norm inputs: fp32 (parameters are fp32, autocast runs norms in fp32)
    C, hd, nh, nkv, H = m.n_embd, m.head_dim, m.n_head, m.n_kv_head, m.ffn_hidden
    attn = (nh + 2 * nkv) * hd * a  # fused qkv output (v stays alive as a view of it)
    if m.pos_emb == "rope":
        attn += (nh + nkv) * hd * a  # rotated q and k
    if m.qk_norm:
        attn += (nh + nkv) * hd * a
    if nkv != nh:
        attn += 2 * nh * hd * a  # k and v repeated for grouped-query attention
    attn += C * a  # SDPA output; fused kernels lay it out as (B, T, nh, hd), so c_proj's reshape is a view
    mlp = 4 * H * a if m.mlp == "swiglu" else 2 * H * a  # swiglu: [gate|up], silu(gate), product
    norms = 2 * C * r + 2 * C * a  # two norm inputs (fp32) and the 16-bit copies the matmuls save
    drop = 2 * C if m.dropout > 0 else 0  # 1-byte masks of the two residual dropouts
    return {
        "block": norms + attn + mlp + drop,
        "boundary": C * r,  # what a checkpointed block keeps: its input
        "outside": C * r + C * a,  # final norm input and the head's input
    }


def activation_bytes(m: ModelConfig, s: Setting, checkpointing: str | None = None) -> int:
    """Saved activations of one micro-batch, with the given (or the setting's) checkpointing."""
    per = activation_bytes_per_token(m, s.precision)
    mode = checkpointing or s.checkpointing
    L = m.n_layer
    if mode == "full":
        n_ckpt = L
    elif mode == "every_k":
        n_ckpt = L // max(1, s.checkpointing_k)
    else:
        n_ckpt = 0
    # checkpointed blocks keep their input; during backward one of them is recomputed in full
    per_token = n_ckpt * per["boundary"] + (L - n_ckpt) * per["block"] + per["outside"]
    per_token += per["block"] if n_ckpt else 0
    return s.micro_batch_size * s.seq_len * per_token


def logits_bytes(m: ModelConfig, s: Setting) -> int:
    """Logits, log-softmax and a gradient of one micro-batch (fp32: the loss is computed in fp32)."""
    return s.micro_batch_size * s.seq_len * m.resolved().padded_vocab_size * LOGIT_BYTES


def memory_breakdown(m: ModelConfig, s: Setting, kind: str = "cuda") -> dict[str, int]:
    """Bytes per GPU by category for a model and setting (see the module docstring for the model)."""
    m = m.resolved()
    p = param_breakdown(m)
    n = p["total"]
    n_matmul = p["blocks"] + m.padded_vocab_size * m.n_embd  # blocks and the output head (tied or not)
    half = s.precision in ("bf16", "fp16")
    cdt = 2 if half else 4  # bytes of a parameter as computed with
    g = max(1, s.gpus)
    if s.parallel == "fsdp" and g > 1:
        shard = 0 if s.cpu_offload else 1
        unit = (p["blocks"] // m.n_layer) * cdt  # one block gathered in the compute dtype
        gathered = 2 * unit if s.reshard_after_forward else n * cdt  # current + prefetched, or all
        weights = shard * 4 * n // g + gathered
        grads = shard * 4 * n // g + (p["blocks"] // m.n_layer) * 4
        optim = shard * optimizer_bytes(m, s.optimizer) // g
    else:
        weights = 4 * n + (2 * n_matmul if half else 0)
        grads = 4 * n * (2 if g > 1 else 1)
        optim = optimizer_bytes(m, s.optimizer)
    out = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": activation_bytes(m, s),
        "logits": logits_bytes(m, s),
        "runtime": CUDA_OVERHEAD if kind == "cuda" else HOST_OVERHEAD,
    }
    return out


def block_matrix_params(m: ModelConfig) -> int:
    """Parameters of the weight matrices inside the blocks: those train.optimizer=muon steps with Muon."""
    m = m.resolved()
    C, hd, H = m.n_embd, m.head_dim, m.ffn_hidden
    qkv = C * (m.n_head + 2 * m.n_kv_head) * hd
    mlp = C * (2 if m.mlp == "swiglu" else 1) * H + H * C
    return m.n_layer * (qkv + m.n_head * hd * C + mlp)


def optimizer_bytes(m: ModelConfig, optimizer: str) -> int:
    """Optimizer state of the whole model: AdamW 8 bytes a parameter (two fp32 moments), 8-bit AdamW 2;
    Muon keeps one fp32 momentum buffer per block matrix (4 bytes a parameter) and AdamW's moments for
    the embedding, head, norms and biases. Muon's transient Newton-Schulz copies of one matrix are left out
    (a few MB at 124M)."""
    n = param_breakdown(m)["total"]
    if optimizer == "adamw8bit":
        return 2 * n
    if optimizer == "muon":
        nm = block_matrix_params(m)
        return 4 * nm + 8 * (n - nm)
    return 8 * n


def largest_micro_batch(m: ModelConfig, s: Setting, capacity: int, kind: str, upto: int = 1024) -> int:
    """The largest power-of-two micro-batch (<= upto) whose memory fits `capacity`; 0 if none."""
    best, b = 0, 1
    while b <= upto:
        if sum(memory_breakdown(m, dataclasses.replace(s, micro_batch_size=b), kind).values()) <= capacity:
            best = b
        else:
            break
        b *= 2
    return best


def for_device(s: Setting, device: Device) -> Setting:
    """The setting as it would run on a device: one process on a Mac or CPU, fp32 on CPUs without bf16."""
    if device.kind == "cpu" and s.precision == "bf16" and not _native_bf16():
        s = dataclasses.replace(s, precision="fp32")
    if device.kind != "cuda" or not device.multi_gpu:
        s = dataclasses.replace(s, gpus=1, parallel="ddp")
    return s


def make_it_fit(m: ModelConfig, s: Setting, device: Device) -> tuple[Setting | None, str]:
    """The first change, cheapest first, that makes the setting fit the device; (None, why) if none does.

    Order: a smaller micro-batch (accumulation keeps the global batch), then activation checkpointing,
    then 8-bit AdamW (CUDA only), then FSDP over 2, 4 or 8 GPUs.
    """
    s = for_device(s, device)
    if _fits(m, s, device):
        return s, "fits as configured"
    tries: list[tuple[str, Setting]] = []
    tries.append(("", s))
    ck = dataclasses.replace(s, checkpointing="full")
    tries.append(("activation checkpointing (full)", ck))
    o8 = dataclasses.replace(ck, optimizer="adamw8bit")
    if device.kind == "cuda" and s.optimizer != "muon":  # 8-bit AdamW needs CUDA; Muon stays Muon
        tries.append(("8-bit AdamW + activation checkpointing", o8))
    if device.multi_gpu:
        for g in (2, 4, 8):
            tries.append((f"FSDP over {g} GPUs + activation checkpointing", _fsdp(ck, g)))
    for what, cand in tries:
        mb = min(
            largest_micro_batch(m, cand, device.memory, device.kind, s.micro_batch_size), s.micro_batch_size
        )
        if mb >= 1:
            fixed = dataclasses.replace(cand, micro_batch_size=mb)
            note = f"micro-batch {mb}" if mb != s.micro_batch_size else ""
            return fixed, ", ".join(x for x in (what, note) if x)
    tried = [w for w, _ in tries if w][-1]
    return None, f"does not fit, even at micro-batch 1 with {tried}"


def _fsdp(s: Setting, g: int) -> Setting:
    return dataclasses.replace(s, parallel="fsdp", gpus=g)


def _fits(m: ModelConfig, s: Setting, device: Device) -> bool:
    return sum(memory_breakdown(m, s, device.kind).values()) <= device.memory


def _native_bf16() -> bool:
    from .device import cpu_has_native_bf16

    return cpu_has_native_bf16()


def tokens_per_second(m: ModelConfig, s: Setting, device: Device, mfu: float) -> float:
    """Predicted training tokens/s over all GPUs at the assumed MFU; recomputation costs a forward pass."""
    fpt = flops_per_token(m, s.seq_len)
    if s.checkpointing == "full":
        fpt = fpt * 4 / 3  # the forward (a third of fwd+bwd) runs twice
    elif s.checkpointing == "every_k":
        fpt = fpt * (1 + 1 / (3 * max(1, s.checkpointing_k)))
    return mfu * device.peak_flops * s.gpus / fpt


@dataclass
class Estimate:
    """Everything `lmforge estimate` reports."""

    model: ModelConfig
    setting: Setting
    device: Device
    params: dict[str, int]
    flops_per_token: int
    memory: dict[str, int]
    activations_no_ckpt: int
    activations_full_ckpt: int
    total_tokens: int
    global_batch: int
    tokens_per_s: float
    mfu: float
    table: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def chinchilla_tokens(self) -> int:
        """Compute-optimal tokens, ~20 per parameter (Hoffmann et al., 2022)."""
        return 20 * self.params["total"]


def resolve_model(cfg: Config) -> ModelConfig:
    """The model config with a vocabulary: from the config, or from DATA_DIR's tokenizer."""
    m = cfg.model
    if m.vocab_size is None and cfg.data:
        from .data import load_meta

        m = dataclasses.replace(m, vocab_size=int(load_meta(cfg.data)["vocab_size"]))
    if m.vocab_size is None:
        raise EstimateError(
            "model.vocab_size is not set: pass --preset NAME, --model.vocab_size=N or --data DATA_DIR"
        )
    return m.resolved()


def local_device(device) -> Device:
    """The Device entry for a torch.device of this machine (its name, memory and peak FLOP/s)."""
    import torch

    from .device import peak_flops

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Device(props.name, props.total_memory, peak_flops(device) or 100e12, "cuda")
    if device.type == "mps":
        return find_device("apple")
    return _cpu_device()


def estimate(
    cfg: Config,
    gpu: str | None = None,
    gpus: int | None = None,
    mfu: float = ASSUMED_MFU,
    device: Device | None = None,
    precision: str | None = None,
) -> Estimate:
    """The whole plan for a config on a device (default: an RTX 4090) and a number of GPUs."""
    m = resolve_model(cfg)
    cfg = dataclasses.replace(cfg, model=m)
    device = device or (find_device(gpu) if gpu else find_device("4090"))
    precision = precision or cfg.train.precision
    if precision == "auto":
        precision = "fp32" if device.kind == "cpu" and not _native_bf16() else "bf16"
    s = setting_from_config(cfg, gpus, precision)
    notes = []
    if cfg.train.micro_batch_size == "auto":  # what `auto` would pick, by this estimate
        mb = largest_micro_batch(m, s, device.memory, device.kind)
        s = dataclasses.replace(s, micro_batch_size=max(1, mb))
        notes.append(
            f"micro-batch       auto -> {max(1, mb)} on {device.name} by this estimate (training tries it)"
        )
    gb = cfg.train.global_batch_size or s.micro_batch_size * s.gpus
    tokens_per_step = gb * s.seq_len
    steps = cfg.train.steps_for(tokens_per_step)
    est = Estimate(
        model=m,
        setting=s,
        device=device,
        params=param_breakdown(m),
        flops_per_token=flops_per_token(m, s.seq_len),
        memory=memory_breakdown(m, s, device.kind),
        activations_no_ckpt=activation_bytes(m, s, "none"),
        activations_full_ckpt=activation_bytes(m, s, "full"),
        total_tokens=steps * tokens_per_step,
        global_batch=gb,
        tokens_per_s=tokens_per_second(m, s, device, mfu),
        mfu=mfu,
        notes=notes,
    )
    for d in devices():
        fixed, what = make_it_fit(m, s, d)
        needs = sum(memory_breakdown(m, for_device(s, d), d.kind).values())
        row = {"device": d.name, "memory": d.memory, "needs": needs}
        row["fits"] = what == "fits as configured"
        row["change"] = what
        row["setting"] = fixed
        if fixed is not None:
            tps = tokens_per_second(m, fixed, d, mfu)
            row["tokens_per_s"] = tps
            row["hours"] = est.total_tokens / tps / 3600
        est.table.append(row)
    return est


def measure_step_peak(model, x, y) -> int:
    """Peak bytes allocated on the CPU during one forward/backward, above what was allocated before.

    Read from the torch profiler's allocator events (every CPU allocation and free, in order).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x, y).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak
