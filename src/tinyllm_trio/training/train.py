"""`tinyllm-trio train`: train TinyLLM with PyTorch and export the numpy server's checkpoint.

    tinyllm-trio corpus --out data
    tinyllm-trio train --data data --out runs/austen   # the defaults are the shipped run

The vocabulary is `build_vocab` over the training split (3200 words + 60 characters + 6 specials
= 3266, the seed's shape). Each training chapter is encoded as ``BOS ... EOS`` and the chapters
are concatenated into one token stream; a batch is ``--batch-size`` random contiguous windows of
``--block-size + 1`` tokens. AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up
then cosine decay to ``--min-lr``, gradient clipping at 1.0, dropout 0.1, a fixed seed.

Written to ``--out``:
  train_state.pt   model + optimizer + step + RNG states, to ``--resume`` from
  best.pt          the weights with the lowest held-out loss so far
  config.json, model.safetensors, tokenizer.json   the exported checkpoint (float16), from the
                   best-held-out weights (``--export last`` for the final ones)
  train_log.json   steps, tokens seen, wall time, losses, the eval history

torch is imported inside functions only, so `tinyllm-trio --help` and the server never need it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm_trio.model.tokenizer import HybridTokenizer, build_vocab
from tinyllm_trio.training.corpus import read_documents
from tinyllm_trio.training.evaluate import encode_stream

# Austen's text has only 52 distinct characters inside words, but the seed's vocabulary shape needs
# 60. These typographic marks (common in text people type, absent from the corpus) fill the rest:
# each is counted twice as a one-character word, too rare to enter the word list but enough to
# rank after every character that the corpus does use.
CHAR_SUPPLEMENT = "\u2014 \u2013 \u201c \u201d \u2018 \u2019 \u2026 \u00e9"


def vocab_texts(train_docs: list[str]) -> list[str]:
    """What build_vocab counts: the training split plus CHAR_SUPPLEMENT twice."""
    return [*train_docs, CHAR_SUPPLEMENT, CHAR_SUPPLEMENT]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data", help="directory with train.txt and heldout.txt")
    p.add_argument("--out", required=True, help="output directory (checkpoint + training state)")
    p.add_argument("--steps", type=int, default=2600, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256, help="tokens per training window")
    p.add_argument(
        "--long-frac",
        type=float,
        default=0.3,
        help="fraction of the steps, at the end, trained on max-context windows (batch scaled "
        "down to keep tokens per step), so positions past --block-size are trained too",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the last step")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-interval", type=int, default=200, help="steps between held-out evals")
    p.add_argument("--eval-windows", type=int, default=64, help="max held-out windows per eval")
    p.add_argument("--resume", default=None, help="a train_state.pt to continue from")
    p.add_argument(
        "--init",
        default=None,
        help="a checkpoint directory whose weights, shape and vocabulary start the run "
        "(fresh optimizer and schedule: training continued under new settings)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--export", choices=["best", "last"], default="best")
    p.add_argument(
        "--export-only", action="store_true", help="only export --resume's weights to --out"
    )
    g = p.add_argument_group("model shape (defaults: the seed's TinyLLM)")
    g.add_argument("--n-layer", type=int, default=6)
    g.add_argument("--n-embd", type=int, default=192)
    g.add_argument("--n-head", type=int, default=6)
    g.add_argument("--max-context", type=int, default=512)
    g.add_argument("--attention-scale", choices=["head", "embd"], default="head")
    g.add_argument("--n-words", type=int, default=3200, help="words in the vocabulary")
    g.add_argument("--n-chars", type=int, default=60, help="characters in the vocabulary")


def lr_at(step: int, *, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _windows(stream: np.ndarray, block: int, limit: int) -> np.ndarray:
    """Non-overlapping windows of block+1 tokens (input + shifted target), evenly spread."""
    n = (len(stream) - 1) // block
    starts = np.arange(n) * block
    if n > limit:
        starts = starts[np.linspace(0, n - 1, limit).astype(int)]
    return np.stack([stream[s : s + block + 1] for s in starts])


def _config_from_args(args: argparse.Namespace, vocab_size: int):
    from tinyllm_trio.model.transformer import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_layer=args.n_layer,
        max_context=args.max_context,
        attention_scale=args.attention_scale,
    )


def export(out: Path, config: Any, weights: dict[str, np.ndarray], tok: HybridTokenizer) -> None:
    """Write our checkpoint directory (config.json, model.safetensors float16, tokenizer.json)."""
    from tinyllm_trio.model.checkpoint import save_checkpoint
    from tinyllm_trio.model.transformer import Transformer

    save_checkpoint(out, Transformer(config, weights), tok, dtype="float16")


def run_cli(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("error: training needs PyTorch: pip install -e '.[train]'", file=sys.stderr)
        return 1
    from tinyllm_trio.model.transformer import ModelConfig
    from tinyllm_trio.training.torch_model import TorchTransformer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    if args.export_only:
        if not args.resume:
            print("error: --export-only needs --resume STATE", file=sys.stderr)
            return 2
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        config = ModelConfig.from_dict(state["config"])
        tok = HybridTokenizer.from_dict(state["tokenizer"])
        key = "best_model" if args.export == "best" and state.get("best_model") else "model"
        weights = {k: v.float().numpy() for k, v in state[key].items()}
        export(out, config, weights, tok)
        at = state["step"]
        if key == "best_model" and state["history"]:
            at = min(state["history"], key=lambda h: h["heldout_loss"])["step"]
        print(f"exported the {key.replace('_', ' ')} weights (step {at}) to {out}")
        return 0

    data = Path(args.data)
    train_docs = read_documents(data / "train.txt")
    heldout_docs = read_documents(data / "heldout.txt")
    state = None
    init = None
    if args.resume and args.init:
        print("error: --init starts a new run; --resume continues one: give one", file=sys.stderr)
        return 2
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        tok = HybridTokenizer.from_dict(state["tokenizer"])
    elif args.init:
        from tinyllm_trio.model.checkpoint import load_model

        loaded = load_model(args.init)
        init, tok = loaded.transformer, loaded.tokenizer
    else:
        tok = build_vocab(vocab_texts(train_docs), n_words=args.n_words, n_chars=args.n_chars)
    t0 = time.perf_counter()
    train_ids = encode_stream(tok, train_docs)
    heldout_ids = encode_stream(tok, heldout_docs)
    print(
        f"vocab {tok.vocab_size}; train {len(train_ids):,} tokens ({len(train_docs)} docs), "
        f"held-out {len(heldout_ids):,} tokens; encoded in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    # a resumed or --init run keeps the model's shape (the shape flags are ignored then)
    if state is not None:
        config = ModelConfig.from_dict(state["config"])
    elif init is not None:
        config = init.config
    else:
        config = _config_from_args(args, tok.vocab_size)
    block = min(args.block_size, config.max_context, len(train_ids) - 2)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    model = TorchTransformer(config, dropout=args.dropout).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    step = 0
    tokens_seen = 0
    wall_before = 0.0
    history: list[dict[str, float]] = []
    best_loss = math.inf
    best_model: dict[str, Any] | None = None
    if init is not None:
        model.load_numpy_weights(init.weights())
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        wall_before, history = state["wall_s"], state["history"]
        best_loss, best_model = state["best_loss"], state.get("best_model")
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]

    # evaluation uses max-context windows, as `tinyllm-trio eval` does
    eval_block = min(config.max_context, len(heldout_ids) - 1, len(train_ids) - 1)
    heldout_windows = torch.from_numpy(
        _windows(heldout_ids, eval_block, args.eval_windows).astype(np.int64)
    )
    train_windows = torch.from_numpy(
        _windows(train_ids, eval_block, min(32, args.eval_windows)).astype(np.int64)
    )

    @torch.no_grad()
    def mean_loss(windows: torch.Tensor) -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(windows), 8):
            w = windows[i : i + 8].to(device)
            logits = model(w[:, :-1])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += w[:, 1:].numel()
        model.train()
        return total / count

    def save_state() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "tokens_seen": tokens_seen,
                "wall_s": wall_before + (time.perf_counter() - t_start),
                "history": history,
                "best_loss": best_loss,
                "best_model": best_model,
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": rng.bit_generator.state,
                "config": config.to_dict(),
                "tokenizer": tok.to_dict(),
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            },
            out / "train_state.pt.tmp",
        )
        (out / "train_state.pt.tmp").replace(out / "train_state.pt")

    def evaluate() -> None:
        nonlocal best_loss, best_model
        held = mean_loss(heldout_windows)
        train = mean_loss(train_windows)
        history.append(
            {"step": step, "tokens": tokens_seen, "train_loss": train, "heldout_loss": held}
        )
        if held < best_loss:
            best_loss = held
            best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        bar.write(
            f"step {step}: train loss {train:.4f} (ppl {math.exp(train):.1f}), "
            f"held-out loss {held:.4f} (ppl {math.exp(held):.1f}), "
            f"{tokens_seen:,} tokens, {wall_before + time.perf_counter() - t_start:.0f}s"
        )
        sys.stdout.flush()

    import torch.nn.functional as F
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=args.steps,
        initial=step,
        mininterval=0.5 if tty else 10.0,
        dynamic_ncols=tty,
        desc="train",
    )
    model.train()
    t_start = time.perf_counter()
    t_window, tok_window = time.perf_counter(), 0
    n_tokens = len(train_ids)
    long_block = min(config.max_context, n_tokens - 2)
    long_start = args.steps - round(args.long_frac * args.steps)
    while step < args.steps:
        if step >= long_start and long_block > block:
            cur_block, cur_batch = long_block, max(1, args.batch_size * block // long_block)
        else:
            cur_block, cur_batch = block, args.batch_size
        lr = lr_at(step, peak=args.lr, floor=args.min_lr, warmup=args.warmup, total=args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, n_tokens - cur_block - 1, cur_batch)
        batch = torch.from_numpy(
            np.stack([train_ids[s : s + cur_block + 1] for s in starts]).astype(np.int64)
        ).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens_seen += cur_batch * cur_block
        tok_window += cur_batch * cur_block
        now = time.perf_counter()
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tok_window / (now - t_window):.0f}",
            refresh=False,
        )
        if now - t_window > 60:
            t_window, tok_window = now, 0
        bar.update(1)
        if step % args.eval_interval == 0 or step == args.steps:
            evaluate()
            save_state()
    bar.close()
    if not history or history[-1]["step"] != step:
        evaluate()
    save_state()
    wall = wall_before + time.perf_counter() - t_start

    final = model.state_dict()
    chosen = best_model if args.export == "best" and best_model is not None else final
    weights = {k: v.detach().cpu().float().numpy() for k, v in chosen.items()}
    torch.save(chosen, out / "best.pt" if chosen is best_model else out / "last.pt")
    last = history[-1]
    chosen_entry = min(history, key=lambda h: h["heldout_loss"]) if chosen is best_model else last
    log = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens_seen / wall, 1) if wall else None,
        "batch_size": args.batch_size,
        "block_size": block,
        "long_block_size": long_block,
        "long_from_step": long_start,
        "final_train_loss": last["train_loss"],
        "final_heldout_loss": last["heldout_loss"],
        "exported": args.export,
        "exported_step": chosen_entry["step"],
        "exported_train_loss": chosen_entry["train_loss"],
        "exported_heldout_loss": chosen_entry["heldout_loss"],
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": str(device),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "config": config.to_dict(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "history": history,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    export(out, config, weights, tok)
    print(
        f"done: {step} steps, {tokens_seen:,} tokens in {wall:.0f}s "
        f"({tokens_seen / max(wall, 1e-9):.0f} tokens/s); exported step {chosen_entry['step']} "
        f"(held-out loss {chosen_entry['heldout_loss']:.4f}) to {out}"
    )
    return 0
