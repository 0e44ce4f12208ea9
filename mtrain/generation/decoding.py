"""The decoding loop: batched sampling from a GPT with its KV cache, one token per step."""

from collections.abc import Sequence

import torch

from mtrain.generation.sampling import SamplingConfig, disallow, next_token
from mtrain.model import GPT


@torch.inference_mode()
def decode(
    model: GPT,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    sampling: SamplingConfig,
    stop_id: int | None,
    max_len: int | None = None,
    *,
    banned_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt (id lists, or a LongTensor [batch, time]); a row ends on
    drawing ``stop_id`` (kept as its last token), after ``sampling.max_new_tokens``, or when the
    whole sequence reaches ``max_len`` (the model's max_seq_len by default, and at most).
    ``banned_ids`` are never drawn. The model should be in eval mode.

    Prompts may differ in length, without padding (the model has no mask for it): the common
    length is prefilled in one forward pass, then the longer prompts' own tokens are fed where
    the others draw. With the KV cache each later step feeds one token; without it every step
    runs the model over the whole sequence again, the baseline the cache is measured against.
    """
    prompts = [[int(i) for i in row] for row in prompt_ids]
    limit = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generation needs one prompt or more, each of one token (BOS) or more")
    longest = max(map(len, prompts))
    if longest > limit:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than the limit of {limit} positions "
            f"(model.max_seq_len={model.config.max_seq_len}): shorten it"
        )
    device = model.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = min(limit, longest + sampling.max_new_tokens)
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    # Where each row's new tokens end (exclusive): moved forward when the row draws stop_id.
    ends = (lengths + sampling.max_new_tokens).clamp(max=total)
    cache = model.new_kv_cache(len(prompts), total) if use_cache else None
    generator = torch.Generator(device).manual_seed(sampling.seed)
    for t in range(int(lengths.min()), total):
        if bool((ends <= t).all()):
            break
        fed = cache.pos if cache is not None else 0
        logits = model(tokens[:, fed:t], kv_cache=cache).logits[:, -1]
        drawn = next_token(disallow(logits, banned_ids), tokens[:, :t], sampling, generator)
        in_prompt = t < lengths
        tokens[:, t] = torch.where(in_prompt, tokens[:, t], drawn)
        if stop_id is not None:
            stopped = ~in_prompt & (drawn == stop_id) & (t < ends)
            ends = torch.where(stopped, t + 1, ends)
    return [
        row[start:end]
        for row, start, end in zip(tokens.tolist(), lengths.tolist(), ends.tolist(), strict=True)
    ]
