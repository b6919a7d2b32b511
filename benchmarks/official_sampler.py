"""Baseline: the cost structure of the official RAR sampler (bytedance/1d-tokenizer, modeling/rar.py `generate`),
re-expressed in our own code on the weights of a `RARForImageGeneration`.

What each of the L steps costs, as in the official loop:
  - the guidance scale is rebuilt from small device tensors;
  - the whole prefix input is rebuilt: ids of the doubled batch concatenated with the class/null tokens, embedded,
    raster `orders` stacked from one `arange` per row, the position and target-aware tables (official length
    L + 1024 rows) `repeat`ed over the batch, shuffled by advanced indexing and concatenated, plus the AdaLN condition
    (class embedding + per-position table) for the whole prefix;
  - only the last position then runs through the blocks, whose KV cache grows by `torch.cat` per step per layer;
  - guided logits `u + (c - u) * scale`, divided by the temperature, softmax, `torch.multinomial`.
Greedy decoding (argmax) and teacher forcing are added for the parity check (`--check`); they are not official.

    python benchmarks/official_sampler.py --check
"""

import argparse

import torch
import torch.nn.functional as F

OFFICIAL_EXTRA_POSITIONS = 1024  # the official pos_embed / target_aware_pos_embed have image_seq_len + 1024 rows


class OfficialSampler:
    def __init__(self, model):
        self.model, inner = model, model.model
        config = model.config
        self.length, self.codebook_size, self.num_classes = config.image_seq_len, config.codebook_size, config.num_classes
        self.num_heads, self.null_id = config.num_attention_heads, config.null_class_id
        hidden, rows = config.hidden_size, config.image_seq_len + OFFICIAL_EXTRA_POSITIONS
        p = inner.position_embedding
        # Our tables padded to the official parameter shapes (the extra rows are never read, but repeated each step).
        self.pos_embed = torch.zeros(1, rows, hidden, dtype=p.dtype, device=p.device)
        self.pos_embed[0, : p.shape[0]] = p.detach()
        self.target_aware_pos_embed = torch.zeros_like(self.pos_embed)
        if inner.target_aware_position_embedding is not None:  # a folded model has it inside pos_embed already
            self.target_aware_pos_embed[0, : p.shape[0]] = inner.target_aware_position_embedding.detach()
        self.timesteps_embeddings = inner.condition_position_embedding.detach()[None]
        self.attn_mask = torch.full((rows, rows), float("-inf"), dtype=p.dtype, device=p.device).triu_(1)
        self.k_cache, self.v_cache = None, None

    def _shuffle(self, x, orders):
        batch_indices = torch.arange(x.shape[0]).unsqueeze(1).expand(-1, orders.shape[1])  # on the CPU, as official
        return x[batch_indices, orders]

    def _block(self, i, layer, x, c, attn_mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.adaln_modulation(F.silu(c)).chunk(6, -1)
        h = layer.input_layernorm(x) * (1 + scale_msa) + shift_msa
        attn, (batch, n, width) = layer.self_attn, h.shape
        q, k, v = attn.qkv_proj(h).reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.k_cache is not None:
            if self.k_cache[i] is not None:
                k, v = torch.cat([self.k_cache[i], k], dim=-2), torch.cat([self.v_cache[i], v], dim=-2)
            self.k_cache[i], self.v_cache[i] = k, v
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(batch, n, width)
        x = x + gate_msa * attn.o_proj(h)
        h = layer.post_attention_layernorm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))

    def forward(self, ids, condition):
        """Logits for every position of `[cls, condition, ids]`, or only the last one once the KV cache is filled."""
        inner, batch, prefix = self.model.model, ids.shape[0], 2
        orders = torch.stack([torch.arange(self.length, device=ids.device) for _ in range(batch)])
        input_ids = torch.cat([condition.view(batch, -1), ids.view(batch, -1)], dim=1)
        embeddings = inner.embed_tokens(input_ids)
        pos_embed = self.pos_embed.repeat(batch, 1, 1)
        pos_embed = torch.cat([pos_embed[:, :prefix], self._shuffle(pos_embed[:, prefix : prefix + self.length], orders)], 1)
        target = self.target_aware_pos_embed.repeat(batch, 1, 1)
        target = self._shuffle(target[:, prefix : prefix + self.length], orders)
        x = torch.cat([inner.cls_token.expand(batch, -1, -1), embeddings], dim=1)
        x = x + pos_embed[:, : x.shape[1]]
        x = x + torch.cat([torch.zeros_like(x[:, : prefix - 1]), target, torch.zeros_like(x[:, -1:])], 1)[:, : x.shape[1]]
        attn_mask = self.attn_mask[: x.shape[1], : x.shape[1]]
        c = embeddings[:, :1] + self.timesteps_embeddings[:, : x.shape[1]]
        if self.k_cache is not None and self.k_cache[0] is not None:
            x, c, attn_mask = x[:, -1:], c[:, -1:], None
        for i, layer in enumerate(inner.layers):
            x = self._block(i, layer, x, c, attn_mask)
        if self.k_cache is None:
            x, c = x[:, prefix - 1 :], c[:, prefix - 1 :]
        scale, shift = inner.final_adaln_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.model.lm_head(inner.norm(x) * (1 + scale) + shift)

    @torch.no_grad()
    def generate(self, class_labels, guidance_scale, guidance_scale_pow=0.0, temperature=1.0, num_tokens=None,
                 kv_cache=True, greedy=False, forced_tokens=None, return_logits=False):
        """Image tokens `(B, num_tokens)` for class ids `class_labels` (ints in [0, num_classes)).

        `forced_tokens` (B, >= num_tokens) teacher-forces the prefix; `return_logits` also returns the guided logits
        (before temperature) of every step. As the official code, any `guidance_scale != 0` doubles the batch."""
        condition = torch.as_tensor(class_labels, device=self.pos_embed.device) + self.codebook_size + 1
        batch, device = condition.shape[0], condition.device
        ids = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        num_layers = len(self.model.model.layers)
        self.k_cache, self.v_cache = ([None] * num_layers, [None] * num_layers) if kv_cache else (None, None)
        all_logits = []
        for step in range(num_tokens or self.length):
            scale_pow = torch.ones(1, device=device) * guidance_scale_pow
            cfg_scale = (guidance_scale - 1) * (1 - torch.cos((step / self.length) ** scale_pow * torch.pi)) / 2 + 1
            if guidance_scale != 0:
                logits = self.forward(torch.cat([ids, ids]), torch.cat([condition, torch.full_like(condition, self.null_id)]))
                cond, uncond = logits[:batch], logits[batch:]
                logits = uncond + (cond - uncond) * cfg_scale
            else:
                logits = self.forward(ids, condition)
            logits = logits[:, -1].float()  # float32 sampling, as the official code under bf16 autocast
            if return_logits:
                all_logits.append(logits)
            if forced_tokens is not None:
                sampled = forced_tokens[:, step : step + 1]
            elif greedy:
                sampled = logits.argmax(dim=-1, keepdim=True)
            else:
                sampled = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1)
            ids = torch.cat([ids, sampled], dim=-1)
        self.k_cache, self.v_cache = None, None
        return (ids, torch.stack(all_logits, 1)) if return_logits else ids


def check_parity(model, guidance_scale=3.0, guidance_scale_pow=1.5, num_tokens=None, batch_size=2, kv_cache=True,
                 **generate_kwargs):
    """Teacher-forced guided logits and greedy tokens of the baseline against `model.generate(do_sample=False)`.

    Equal logits at every step under the same prefix mean that both draw from the same distribution (both then
    divide by the temperature, softmax and call `torch.multinomial`). Returns (max |logit diff|, logit scale, greedy
    token agreement). `generate_kwargs` go to `model.generate` (e.g. `cache_implementation="static"`)."""
    labels = [i % model.config.num_classes for i in range(batch_size)]
    num_tokens = num_tokens or model.config.image_seq_len
    out = model.generate(class_labels=labels, guidance_scale=guidance_scale, guidance_scale_pow=guidance_scale_pow,
                         do_sample=False, temperature=1.0, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                         return_dict_in_generate=True, output_scores=True, disable_compile=True,
                         **generate_kwargs)
    ours_tokens, ours_logits = out.sequences[:, 1:], torch.stack(out.scores, 1)
    sampler = OfficialSampler(model)
    # The official code doubles the batch whenever guidance_scale != 0; with g == 1 ours runs only the conditional
    # rows, which gives the same logits (u + (c - u) * 1 == c up to rounding).
    _, logits = sampler.generate(labels, guidance_scale, guidance_scale_pow, num_tokens=num_tokens, kv_cache=kv_cache,
                                 forced_tokens=ours_tokens, return_logits=True)
    greedy = sampler.generate(labels, guidance_scale, guidance_scale_pow, num_tokens=num_tokens, kv_cache=kv_cache,
                              greedy=True)
    diff = (logits - ours_logits).abs().max().item()
    return diff, ours_logits.abs().max().item(), (greedy == ours_tokens).float().mean().item()


def tiny_model(fold=False, seed=0):
    from rar_hf.configuration_rar import RARConfig
    from rar_hf.modeling_rar import RARForImageGeneration

    torch.manual_seed(seed)
    config = RARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       codebook_size=32, num_classes=5, image_seq_len=16, dropout=0.0, attention_dropout=0.0)
    model = RARForImageGeneration(config).eval()
    with torch.no_grad():  # adaLN-zero would make every block the identity: give it weights
        for name, param in model.named_parameters():
            if "adaln_modulation" in name:
                param.normal_(0.0, 0.05)
    return model.fold_target_aware_position_embedding() if fold else model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Parity against model.generate on a tiny random model.")
    args = parser.parse_args()
    if not args.check:
        parser.error("nothing to do: this module is the baseline of benchmarks/generate.py; run it with --check")
    failures = 0
    for fold in (False, True):
        for kv_cache in (True, False):
            for guidance_scale, pow_ in ((3.0, 1.5), (1.0, 0.0), (8.0, 0.0)):
                diff, scale, agree = check_parity(tiny_model(fold), guidance_scale, pow_, kv_cache=kv_cache)
                ok = diff <= 1e-4 * max(1.0, scale) and agree == 1.0
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} folded={fold!s:5} kv_cache={kv_cache!s:5} g={guidance_scale} "
                      f"pow={pow_}: max |logit diff| {diff:.2e} (logits up to {scale:.1f}), greedy agreement {agree:.3f}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
