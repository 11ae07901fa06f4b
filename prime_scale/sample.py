"""`prime-scale sample CKPT`: text from the ancestral sub-token sampler (prime-method.md §6).

Reports the network calls (NFE) and the idle-step ratio: steps that reveal no sub-token reuse the
previous prediction, so NFE = non-idle steps + 1."""

from __future__ import annotations

import argparse
import json

import torch

from prime_scale.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a consolidated directory, a step_<N> folder, a checkpoint or run directory")
    p.add_argument("--steps", type=int, default=128, help="sampling steps (default 128)")
    p.add_argument("--num", type=int, default=2, help="sequences to generate (one batch)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default: model.seq_len)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus probability (1 disables)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompt", default=None, help="text prefix, kept fixed while the rest is generated")
    p.add_argument("--no-carry-over", dest="carry_over", action="store_false",
                   help="sample without the carry-over restriction (invalid codes are counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--json", dest="json_out", action="store_true", help="print one JSON object instead of text")


def generate(loaded, *, steps: int, num: int, length=None, top_p=0.9, temperature=1.0, prompt=None,
             carry_over=True, seed=0) -> tuple[list[str], object]:
    """Decoded texts and the SampleResult for a LoadedModel (prime_scale.inference)."""
    from prime_scale.data import load_tokenizer
    from prime_scale.sampling import INVALID_TOKEN, ancestral_sample

    if loaded.tokenizer_dir is None:
        raise UserError(f"{loaded.source}: the checkpoint carries no tokenizer, so samples cannot be decoded")
    tok = load_tokenizer(loaded.tokenizer_dir)
    length = length or loaded.cfg.model.seq_len
    if not 1 <= length <= loaded.cfg.model.seq_len:
        raise UserError(f"--length must be between 1 and model.seq_len={loaded.cfg.model.seq_len}, got {length}")
    prefix = None
    if prompt:
        prefix = torch.tensor([tok.bos_id, *tok.encode(prompt)], dtype=torch.long)
    result = ancestral_sample(loaded.logits, num, length, loaded.vocab_size, loaded.ell, steps,
                              top_p=top_p, temperature=temperature, prefix=prefix, carry_over=carry_over,
                              generator=torch.Generator().manual_seed(seed))
    special = {tok.bos_id, tok.pad_id, INVALID_TOKEN}
    texts = []
    for row in result.tokens.tolist():
        body = [i for i in row if i not in special and i >= 0]
        if tok.eos_id in body:  # a document ends at its EOS
            body = body[: body.index(tok.eos_id)]
        texts.append(tok.decode(body))
    return texts, result


def main(args: argparse.Namespace) -> int:
    from prime_scale.inference import load_model

    with load_model(args.checkpoint, args.weights) as loaded:
        texts, r = generate(loaded, steps=args.steps, num=args.num, length=args.length, top_p=args.top_p,
                            temperature=args.temperature, prompt=args.prompt, carry_over=args.carry_over,
                            seed=args.seed)
    stats = {"steps": r.steps, "nfe": r.nfe, "idle_steps": r.idle_steps, "isr": r.isr,
             "invalid_codes": r.invalid_codes}
    if args.json_out:
        print(json.dumps({"samples": texts, **stats}, indent=2))
        return 0
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    print(f"--- {r.steps} steps, {r.nfe} network calls, idle-step ratio {r.isr:.2%}, "
          f"invalid codes {r.invalid_codes}")
    return 0
