"""Fine-tuning a pretrained RAR to another class set, and LoRA adapters through PEFT.

RAR's input embedding holds, in this order, the tokenizer's codebook, a mask token, one row per class and the null
class (see `RARConfig`). A new class set changes only the class rows: `adapt_classes` keeps the codebook rows, the
rows of the classes the new set shares with the old one (matched by name, `match_classes`), initialises the others
and keeps the null class as the new last row. `RARForImageGeneration.from_pretrained(path, num_classes=N,
ignore_mismatched_sizes=True)` would re-initialise the whole table, codebook rows included; this is that resize with
the rows that still mean something kept, done in place on a loaded model (any source: a checkpoint's EMA weights too).

LoRA: `lora_config` trains low-rank adapters on RAR's linear layers and, through PEFT's `trainable_token_indices`,
the class rows (and the null row) of the embedding; an adapter folder is PEFT's (`adapter_config.json`,
`adapter_model.safetensors`) plus `rar_adapter.json`, the record that rebuilds its model: the base it was trained on
(where it was, the hash of its weights, its shapes) and the class set. `load_adapter` checks a base against that
record before it applies the adapter.
"""

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .arguments import UserError

logger = logging.getLogger(__name__)

ADAPTER_RECORD = "rar_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The linear layers of a RAR block (attention, MLP, AdaLN) and the final AdaLN: what LoRA adapts by default. The head
# (lm_head) scores the tokenizer's codebook, which a new class set does not change.
DEFAULT_LORA_TARGETS = ("qkv_proj", "o_proj", "fc1", "fc2", "adaln_modulation", "final_adaln_modulation")
NEW_CLASS_INITS = ("null", "mean", "random")
# The config keys that fix the shapes of a RAR model apart from its class count.
ARCHITECTURE_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "codebook_size", "image_seq_len",
    "target_aware_position_embedding_folded",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ class sets
def name_keys(name: str) -> list[str]:
    """The lower-cased whole name, then each comma-separated synonym (as `RARPipeline.labels` reads class names)."""
    synonyms = [part.strip().lower() for part in name.split(",")]
    return list(dict.fromkeys(key for key in [name.strip().lower(), *synonyms] if key))


def match_classes(old_id2label: dict[int, str], new_names: list[str]) -> list[int | None]:
    """For each new class name, the id of the old class of the same name, or None.

    A new name matches an old class when its whole name or one of its comma-separated synonyms (case-insensitive)
    names exactly one old class ("5" and "five" both match "5, five"); a name shared by several old classes (ImageNet
    has two "crane"s) decides nothing, and the next synonym is tried.
    """
    index: dict[str, list[int]] = {}
    for class_id, name in sorted(old_id2label.items()):
        for key in name_keys(name):
            index.setdefault(key, []).append(class_id)
    matches = []
    for name in new_names:
        found = None
        for key in name_keys(name):
            ids = index.get(key, [])
            if len(ids) == 1:
                found = ids[0]
                break
        matches.append(found)
    return matches


@torch.no_grad()
def adapt_classes(model, new_names: list[str], sources: list[int | None], init: str = "null", seed: int = 0):
    """Give `model` (a `RARForImageGeneration`, changed in place and returned) the class set `new_names`.

    `sources[j]` is the old class whose embedding row new class `j` keeps (`match_classes`), or None for a new class,
    whose row is initialised by `init`:

    - "null": the null class's row plus noise: a new class starts as the unconditional model, which draws
      from the whole pretrained distribution, and moves from there (the default; see benchmarks/adaptation.py);
    - "mean": the mean of the old class rows plus noise;
    - "random": the initialisation of a model trained from scratch (truncated normal, `initializer_range`).

    The noise (seeded by `seed`) has the spread of the old class rows around their mean, so new classes start as far
    apart as the old ones are (a tenth of it left them too alike: 0.36 against 0.90 classifier accuracy after 40
    steps, benchmarks/adaptation.py). The codebook and mask rows are kept, and the
    null class's row moves to the new last row. The config's `num_classes` and `id2label` follow.
    """
    if init not in NEW_CLASS_INITS:
        raise ValueError(f"init must be one of {NEW_CLASS_INITS}, got {init!r}")
    if len(sources) != len(new_names):
        raise ValueError(f"{len(sources)} sources for {len(new_names)} class names")
    config = model.config
    first = config.codebook_size + 1
    embedding = model.get_input_embeddings()
    old = embedding.weight
    old_classes = old[first : first + config.num_classes].float()
    null_row = old[config.null_class_id]
    generator = torch.Generator().manual_seed(seed)
    centre = old_classes.mean(0)
    spread = float((old_classes - centre).std()) if config.num_classes > 1 else 0.0
    noise_std = spread if spread > 0 else config.initializer_range

    def fresh_row():
        if init == "random":
            return torch.nn.init.trunc_normal_(torch.empty(old.shape[1]), std=config.initializer_range, generator=generator)
        start = null_row.float() if init == "null" else centre
        return start + noise_std * torch.randn(old.shape[1], generator=generator)

    table = old.new_empty(first + len(new_names) + 1, old.shape[1])
    table[:first] = old[:first]
    for j, source in enumerate(sources):
        table[first + j] = old[first + source] if source is not None else fresh_row().to(old.dtype)
    table[-1] = null_row
    replacement = nn.Embedding(table.shape[0], table.shape[1], device=old.device, dtype=old.dtype)
    replacement.weight.copy_(table)
    replacement.weight.requires_grad_(old.requires_grad)
    model.set_input_embeddings(replacement)
    config.num_classes = len(new_names)
    config.id2label = dict(enumerate(new_names))
    config.label2id = {name: i for i, name in enumerate(new_names)}
    return model


def describe_class_sources(old_id2label: dict[int, str], new_names: list[str], sources: list[int | None], init: str) -> str:
    """One line: which new classes keep which old rows, and how many start afresh."""
    kept = [f"{name!r} <- {old_id2label[s]!r}" for name, s in zip(new_names, sources) if s is not None]
    fresh = [repr(name) for name, s in zip(new_names, sources) if s is None]
    parts = [f"{len(new_names)} classes"]
    if kept:
        parts.append(f"kept from the pretrained model: {', '.join(kept)}")
    if fresh:
        parts.append(f"new ({init} initialisation): {', '.join(fresh)}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ LoRA
def linear_module_names(model) -> list[str]:
    """The distinct last names of `model`'s linear layers (what `--lora_target_modules` chooses from)."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)))


def check_lora_targets(model, targets) -> None:
    """A `ValueError` naming the targets that match no linear layer of `model` (PEFT's rule: a module whose full
    name is the target or ends with "." + target), with the names that would."""
    if targets == "all-linear":
        return
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"{', '.join(unmatched)} {'matches' if len(unmatched) == 1 else 'match'} no linear layer of RAR; its "
            f"linear layers are {', '.join(linear_module_names(model))}."
        )


def class_token_ids(config) -> list[int]:
    """Embedding rows of the classes and the null class."""
    first = config.codebook_size + 1
    return list(range(first, config.null_class_id + 1))


def lora_config(config, rank: int, alpha: float | None = None, dropout: float = 0.0, targets=DEFAULT_LORA_TARGETS):
    """The `peft.LoraConfig` of a RAR fine-tune: LoRA of `rank` on `targets`, and the class rows (and the null row) of
    the embedding trained as PEFT trainable tokens. Those rows are trained in full (not low-rank) and saved in the
    adapter, a few hundred numbers per class; the codebook rows stay frozen, as the tokenizer they stand for does.
    `alpha` defaults to `rank` (LoRA's update scaled by 1)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        trainable_token_indices={"embed_tokens": class_token_ids(config)},
    )


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters an adapter trains, in the model's order (what an EMA of a LoRA run averages)."""
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ the record
def architecture(config) -> dict:
    return {key: getattr(config, key) for key in ARCHITECTURE_KEYS}


def adapter_record(pretrained: dict, config, vqvae: str | None) -> dict:
    """What `rar_adapter.json` holds: the base (where it was, the hash of its weights, its shapes and class count:
    `pretrained` as examples/train_rar.py records it), the adapted class set and which base class each class row
    started from, the VQ model (relative to the folder) if the run recorded one."""
    return {
        "base_model": pretrained["source"],
        "base_weights_sha256": pretrained["weights_sha256"],
        "base_architecture": pretrained["architecture"],
        "base_num_classes": pretrained["num_classes"],
        "num_classes": config.num_classes,
        "id2label": {str(k): v for k, v in sorted(config.id2label.items())},
        "class_sources": pretrained["class_sources"],
        "vqvae": vqvae,
    }


def read_adapter_record(folder) -> dict:
    folder = Path(folder)
    path = folder / ADAPTER_RECORD
    if not path.is_file():
        raise UserError(
            f"{folder}: a PEFT adapter without {ADAPTER_RECORD} (not written by examples/train_rar.py): load it with "
            "peft.PeftModel.from_pretrained(model, folder) onto the model it was trained on"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["id2label"] = {int(k): v for k, v in record["id2label"].items()}
        return record
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise UserError(f"{path}: not a readable adapter record ({type(error).__name__}: {error})") from None


def check_base(record: dict, base, base_name: str, folder) -> None:
    """A `UserError` unless `base` (the model before its classes were adapted) is the base the adapter was trained
    on: its shapes first (named), then the hash of its weights."""
    from .weights import weights_sha256

    trained_on = record["base_model"]
    expected = {**record["base_architecture"], "num_classes": record["base_num_classes"]}
    have = {**architecture(base.config), "num_classes": base.config.num_classes}
    for key, value in expected.items():
        if have.get(key) != value:
            raise UserError(
                f"{folder} was trained on {trained_on} ({key}={value}), not on {base_name} ({key}={have.get(key)}): "
                f"load it onto the base it was trained on"
            )
    if weights_sha256(base) != record["base_weights_sha256"]:
        raise UserError(
            f"{folder} was trained on {trained_on} (weights sha256 {record['base_weights_sha256'][:12]}...), and "
            f"{base_name} holds other weights of the same shapes: load it onto the base it was trained on"
        )


def load_adapter(base, folder, base_name: str | None = None, is_trainable: bool = False):
    """`peft.PeftModel.from_pretrained(base, folder)` for an adapter written by examples/train_rar.py: `base` (a
    `RARForImageGeneration`, e.g. `pipe.transformer` of the base pipeline) is checked against the adapter's record,
    given the adapter's class set (`adapt_classes`; every class row then comes from the adapter) and wrapped.
    Merge with `.merge_and_unload()` for plain `nn.Linear` layers and full speed.
    """
    from peft import PeftModel

    folder = Path(folder)
    record = read_adapter_record(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} (rar-hf loads adapters as safetensors only)")
    check_base(record, base, base_name or str(getattr(base, "name_or_path", "the given model")), folder)
    names = [record["id2label"][i] for i in range(record["num_classes"])]
    adapt_classes(base, names, record["class_sources"])
    return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
