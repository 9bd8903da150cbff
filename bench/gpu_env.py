"""The device check's first part: package versions, the GPU, and bitsandbytes' NF4 path on it
(a 4096 x 11008 NF4 + double-quant Linear4bit, bf16 compute, forward + backward, against the
dequantized matmul; one paged AdamW 8-bit step on a parameter large enough to be paged). Prints one JSON line; exit 1 if bitsandbytes
cannot run there (nothing else can then). `--cpu-smoke`: the same on a small layer on the CPU."""

import importlib.metadata as md
import importlib.util
import json
import sys
import time

PAGED_PROBE_SHAPE = (4096, 64)  # 262,144 elements > bitsandbytes' 1e5 paging threshold
PACKAGES = ("torch", "transformers", "peft", "accelerate", "lightning", "bitsandbytes", "huggingface-hub",
            "tokenizers", "safetensors", "triton", "flash-attn", "liger-kernel", "jsonargparse", "datasets",
            "litgpt", "numpy", "nvidia-ml-py")


def main() -> int:
    smoke = "--cpu-smoke" in sys.argv
    out = {"python": sys.version.split()[0]}
    for d in PACKAGES:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    out["flash_attn_importable"] = importlib.util.find_spec("flash_attn") is not None
    import torch

    out.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    dev = "cuda" if out["cuda_available"] and not smoke else "cpu"
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_total_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        t0 = time.perf_counter()
        import bitsandbytes as bnb

        n_in, n_out, rows = (4096, 11008, 2048) if dev == "cuda" else (256, 512, 64)
        lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True)
        lin.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) * 0.02, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)
        lin = lin.to(dev)
        x = torch.randn(rows, n_in, device=dev, dtype=torch.bfloat16, requires_grad=True)
        y = lin(x)
        y.float().pow(2).mean().backward()
        w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
        ref = x.detach().float() @ w.t()
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        out.update(bnb_linear4bit_out_dtype=str(y.dtype), bnb_rel_err_vs_dequant_matmul=round(rel, 5),
                   bnb_grad_finite=bool(torch.isfinite(x.grad).all()))
        # bitsandbytes pages (managed memory) an optimizer state only from 1e5 elements
        # (Optimizer8bit's min size for paging): a smaller probe would leave the first paged
        # allocation to the 7B part, a minute in.
        p = torch.nn.Parameter(torch.randn(PAGED_PROBE_SHAPE, device=dev))
        opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        state1 = opt.state[p].get("state1")
        out.update(bnb_paged_adamw8bit_step="ok", bnb_paged_probe_numel=p.numel(),
                   bnb_paged_state=bool(getattr(state1, "is_paged", False)))
        out["bnb_numerics_ok"] = rel < 2e-2 and out["bnb_grad_finite"]  # reported; only an exception is fatal
        out["bnb_check_s"] = round(time.perf_counter() - t0, 2)
        out["bnb_ok"] = True
    except Exception as e:  # noqa: BLE001 - any failure here is the answer
        out.update(bnb_ok=False, bnb_error=f"{type(e).__name__}: {e}"[:500])
    print(json.dumps(out))
    return 0 if out["bnb_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
