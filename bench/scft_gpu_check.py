"""GPU check of the SCFT training step and the embedding forward, without Ray: one process, one GPU.

  python3 bench/scft_gpu_check.py --out DIR            # one H100/H200: NCCL, bf16, ~1.1B random Llama
  python bench/scft_gpu_check.py --cpu --tiny --out DIR  # the same code on CPU (gloo, fp32, tiny model)

The device machine has no Ray (its wheel is too large to carry), so this drives the project's
own worker pieces directly: stages.scft.model.build_contrastive_model (LoRA + ContrastiveModel, partitioned load
under ZeRO-3), distributed/engine.py (DeepSpeed ZeRO-2 and ZeRO-3, world size 1), the InfoNCE
loss, gradient checkpointing, and llm/loading.PooledEncoder for the embedding forward. The model
is a random Llama built here; the tokenizer is a byte-level BPE trained here on the prompts; the
prompts are synthetic catalog items (~150 tokens) rendered by data/catalog.render_prompt: no download.

Model FLOPs utilisation (MFU) counts the useful work on real (unpadded) tokens: 4 x N per token for a
training step, N the backbone's parameters without the embedding table (a lookup, no matmul): 2N forward
and 2N backward to the activations (the frozen base gets no weight gradients; LoRA's own FLOPs are <1%).
Hardware FLOPs (HFU) add what the GPU also computes: the padding, and with gradient checkpointing the
forward it recomputes (6N). The embedding forward counts 2N per token. Attention's s^2 term is left out
(~5% at 150 tokens), so the figures are slight underestimates.

What is swept, to find where the GPU is best used: SCFT micro-batch sizes (`--batches`, items per step,
two views each) under ZeRO-2 with and without gradient checkpointing (a 1B model's LoRA training fits an
H100/H200 without it), ZeRO-3 at the first size; the embedding forward at `--embed-batches`, over
length-sorted prompts as the embedding job's model actor gets them (stages/embed/actor.SORT_WINDOW).
SCFT batches stay random: its negatives are the other items of the batch, and both views of a batch are
padded to the longer one (ContrastiveModel), so what padding costs shows as MFU below HFU. Attention is
the backbone's default implementation (SDPA, flash kernels on the GPU), recorded in the results.
Writes scft_gpu.json and scft_gpu.md into --out and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llmemb_dist.config import Config, load_config  # noqa: E402
from llmemb_dist.data.catalog import render_prompt  # noqa: E402
from llmemb_dist.distributed import engine as ds_engine  # noqa: E402
from llmemb_dist.llm.loading import PooledEncoder, load_backbone, resolve_model, tokenize  # noqa: E402
from llmemb_dist.stages.scft.batches import Views, batch_indices  # noqa: E402
from llmemb_dist.stages.scft.model import build_contrastive_model, engine_spec  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16 tensor-core peak (SXM), from NVIDIA's datasheets
# (hidden, intermediate, layers, heads, kv heads): TinyLlama-1.1B's shape, and a tiny one for the CPU run.
SHAPES = {"1b": (2048, 5632, 22, 32, 4), "tiny": (64, 128, 2, 4, 2)}
WORDS = ("drama comedy thriller romance classic story family night city war love detective space journey music "
         "friends secret island winter summer legend young old hero mystery dream river house road king queen").split()


def synthetic_items(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Catalog rows shaped like the real ones (title, year, genres, tags, description)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [[("title", words(4).title()), ("year", str(rng.randint(1950, 2024))), ("genres", ", ".join(rng.sample(WORDS, 3))),
             ("tags", ", ".join(rng.sample(WORDS, 5))), ("description", words(rng.randint(80, 120)))] for _ in range(n)]


def build_tokenizer(prompts: list[str], folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(prompts, vocab_size=8000, special_tokens=["<pad>", "<eos>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(folder)
    return tok


def random_llama(folder: Path, shape: str, vocab: int, dtype: torch.dtype, device: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for 1B on CPU
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512, pad_token_id=0,
            tie_word_embeddings=True, dtype=dtype,
        )).to(dtype)
    model.save_pretrained(folder)
    n = sum(p.numel() for name, p in model.model.named_parameters() if "embed_tokens" not in name)
    del model
    return n


def config(folder: Path, args, zero_stage: int, batch: int, checkpointing: bool = True) -> Config:
    return load_config(None, [
        f"model.path={folder}", f"model.dtype={'fp32' if args.cpu else 'bf16'}", f"model.max_length={args.max_length}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}", f"scft.use_gpu={not args.cpu}", f"scft.zero_stage={zero_stage}",
        f"scft.batch_size={batch}", f"scft.steps={args.steps}",
    ])


def sync(cpu: bool) -> None:
    if not cpu:
        torch.cuda.synchronize()


def train(cfg: Config, items, args) -> dict:
    """Timed SCFT steps, exactly as a worker runs them (stages/scft/worker.py without Ray)."""
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    spec = engine_spec(cfg)
    model, tokenizer = build_contrastive_model(cfg, spec)
    engine = ds_engine.build_engine(model, spec)
    s = cfg.scft
    views = Views(items, cfg.model.instruction, s.drop_ratio, s.augmentation, s.seed, 0)
    engine.train()
    real, padded, losses = 0, 0, []
    for step in range(s.steps):
        if step == args.warmup:
            sync(args.cpu)
            start, real, padded = time.perf_counter(), 0, 0
        a, b = views.prompts(batch_indices(len(items), s.batch_size, step, s.seed, 0), step)
        view_a = {k: v.to(engine.device) for k, v in tokenize(tokenizer, a, cfg.model.max_length).items()}
        view_b = {k: v.to(engine.device) for k, v in tokenize(tokenizer, b, cfg.model.max_length).items()}
        loss, *_ = engine(view_a, view_b)
        engine.backward(loss)
        engine.step()
        # ContrastiveModel pads both views to the longer one and runs them as one batch.
        padded += 2 * s.batch_size * max(view_a["input_ids"].size(1), view_b["input_ids"].size(1))
        real += view_a["attention_mask"].sum() + view_b["attention_mask"].sum()  # stays on the GPU: no sync
        losses.append(loss.detach())  # no float() here: it would wait for the GPU every step
    sync(args.cpu)
    seconds = time.perf_counter() - start
    out = {"batch": s.batch_size, "checkpointing": cfg.model.gradient_checkpointing,
           "items_per_s": (s.steps - args.warmup) * s.batch_size / seconds,
           "tokens_per_s": int(real) / seconds, "padded_tokens_per_s": padded / seconds,
           "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
           "peak_memory_gib": 0.0 if args.cpu else torch.cuda.max_memory_allocated() / 2**30,
           "attention": model.encoder.backbone.config._attn_implementation}
    del engine, model
    gc.collect()
    if not args.cpu:
        torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def embed(cfg: Config, prompts: list[str], tokenizer, batch: int, args) -> dict:
    """Items/s of the catalog embedding forward (PooledEncoder, no LoRA: the same FLOPs), length-sorted."""
    device = "cpu" if args.cpu else "cuda"
    backbone = load_backbone(resolve_model(cfg.model), cfg.model)
    encoder = PooledEncoder(backbone, cfg.model.pooling).to(device).eval()
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    done, real, padded = 0, 0, 0
    for i in range(0, len(prompts), batch):
        if i == batch:  # the first batch warms up
            sync(args.cpu)
            start, done, real, padded = time.perf_counter(), 0, 0, 0
        ids = {k: v.to(device) for k, v in tokenize(tokenizer, [prompts[k] for k in order[i:i + batch]], cfg.model.max_length).items()}
        encoder(ids["input_ids"], ids["attention_mask"])
        done, padded = done + ids["input_ids"].size(0), padded + ids["input_ids"].numel()
        real += ids["attention_mask"].sum()
    sync(args.cpu)
    seconds = time.perf_counter() - start
    out = {"batch": batch, "items_per_s": done / seconds, "tokens_per_s": int(real) / seconds,
           "padded_tokens_per_s": padded / seconds, "attention": backbone.config._attn_implementation}
    del encoder, backbone
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for scft_gpu.json / scft_gpu.md")
    p.add_argument("--cpu", action="store_true", help="gloo and fp32 on CPU (a check of this script, no figures)")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama instead of ~1.1B")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128], help="SCFT items per step (two views each)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--embed-batches", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--embed-items", type=int, default=8192)
    args = p.parse_args()
    if not args.cpu:
        assert torch.cuda.is_available(), "no GPU: pass --cpu"
        torch.backends.cuda.matmul.allow_tf32 = True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo" if args.cpu else "nccl")
    if not args.cpu:
        torch.cuda.set_device(0)

    items = synthetic_items(max(args.embed_items, max(args.batches) * 4), seed=0)
    instruction = Config().model.instruction
    prompts = [render_prompt(instruction, attrs) for attrs in items]
    shape = "tiny" if args.tiny else "1b"
    results: dict = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "shape": shape,
                     "timed_steps": args.steps - args.warmup}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        tokenizer = build_tokenizer(prompts, folder)
        sample = prompts[:500]
        results["tokens_per_prompt"] = sum(len(tokenizer(x)["input_ids"]) for x in sample) / len(sample)
        dtype = torch.float32 if args.cpu else torch.bfloat16
        n = random_llama(folder, shape, len(tokenizer), dtype, "cpu" if args.cpu else "cuda")
        results["params_no_embedding"] = n
        t0 = time.perf_counter()
        rows = []
        for batch in args.embed_batches:
            r = embed(config(folder, args, 0, args.batches[0], checkpointing=False), prompts[:args.embed_items], tokenizer, batch, args)
            rows.append((f"embedding forward, batch {batch}", {**r, "tflops": 2 * n * r["tokens_per_s"] / 1e12,
                                                                "hw_tflops": 2 * n * r["padded_tokens_per_s"] / 1e12}))
        runs = [(2, b, ckpt) for ckpt in (True, False) for b in args.batches] + [(3, args.batches[0], True)]
        for stage, batch, ckpt in runs:
            r = train(config(folder, args, stage, batch, checkpointing=ckpt), items, args)
            r.update(tflops=4 * n * r["tokens_per_s"] / 1e12, hw_tflops=(6 if ckpt else 4) * n * r["padded_tokens_per_s"] / 1e12)
            rows.append((f"SCFT ZeRO-{stage}, batch {batch}, checkpointing {'on' if ckpt else 'off'}", r))
            print(f"{rows[-1][0]} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in results["device"]), None)
    results["bf16_peak_tflops"] = peak
    results["rows"] = dict(rows)
    best = {what: max((r for name, r in rows if name.startswith(what)), key=lambda r: r["tflops"])
            for what in ("embedding", "SCFT")}
    lines = [
        "# SCFT GPU check", "",
        f"Device: {results['device']}; random Llama ({shape}), {n / 1e6:.0f}M parameters without the embedding table; "
        f"{'fp32' if args.cpu else 'bf16'}, attention {best['SCFT']['attention']}, LoRA defaults; "
        f"~{results['tokens_per_prompt']:.0f} tokens per prompt; {results['timed_steps']} timed steps after {args.warmup}. "
        "MFU: useful FLOPs on real tokens (4N per token training, 2N embedding); HFU: what the GPU computes, "
        "padding and recomputation included (see the script's docstring).", "",
        "| what | items/s | real tokens/s | TFLOP/s (MFU) | MFU | HFU | peak GPU mem GiB | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        mfu, hfu = (f"{r['tflops'] / peak:.1%}", f"{r['hw_tflops'] / peak:.1%}") if peak else ("n/a", "n/a")
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else ""
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else ""
        lines.append(f"| {name} | {r['items_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {hfu} | {mem} | {loss} |")
    if peak:
        lines += ["", f"Best: SCFT {best['SCFT']['tflops'] / peak:.1%} MFU (aim 40 %), embedding forward "
                      f"{best['embedding']['tflops'] / peak:.1%} MFU (aim 50 %)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scft_gpu.json").write_text(json.dumps({"command": " ".join(sys.argv), **results}, indent=2))
    (args.out / "scft_gpu.md").write_text("\n".join(lines) + f"\n\nCommand: `python3 {' '.join(sys.argv)}`\n")
    print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
