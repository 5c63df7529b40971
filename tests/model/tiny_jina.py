"""Tiny random jina-embeddings-v3 checkpoints in the *published* on-disk layout.

``make_tiny_jina(path)`` writes a directory that looks like ``jinaai/jina-embeddings-v3`` scaled
down (see docs spec ``../shared/spec/jina-embeddings-v3.md`` sections 1, 2 and 5):

* ``config.json``         -- the published field names/values, sizes scaled down;
* ``model.safetensors``   -- the published key names (``roberta.`` prefix, torch ``parametrize``
                             naming for every LoRA-wrapped Linear/Embedding), float32, random
                             weights, *non-zero* LoRA A and B for all 5 adapters;
* ``tokenizer.json``      -- an XLM-R-like SentencePiece-Unigram fast tokenizer trained on the fly on
                             the STS benchmark sentences, special ids <s>=0 <pad>=1 </s>=2 <unk>=3,
                             <mask>=last, post-processor ``<s> $A </s>``;
* ``tokenizer_config.json`` / ``special_tokens_map.json``.

The tokenizer pipeline deliberately equals the one ``transformers``' ``XLMRobertaTokenizer``
rebuilds from a ``tokenizer.json`` (v5 keeps only the Unigram vocab and re-creates
``WhitespaceSplit + Metaspace(prepend_scheme="always")``, no normalizer unless it is a
SentencePiece ``Precompiled`` one, and ``<s> $A </s>``), so loading the directory with
``tokenizers.Tokenizer.from_file`` or with ``transformers.AutoTokenizer`` gives the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from shared_data import SHARED_DATA

TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
TASK_INSTRUCTIONS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
    "separation": "",
    "classification": "",
    "text-matching": "",
}
LORA_RANK = 4
LORA_ALPHA = 1
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; "<mask>" is appended as the last id
MASK_TOKEN = "<mask>"
DEFAULT_VOCAB_SIZE = 1500  # including the specials and <mask>
MODEL_MAX_LENGTH = 8192

STS_DIR = SHARED_DATA / "stsbenchmark"

# tokenizer.json text, per vocab size: training takes ~1 s, do it once per process/pytest session.
_TOKENIZER_CACHE: dict[int, str] = {}


# --------------------------------------------------------------------------------------------------
# Real text
# --------------------------------------------------------------------------------------------------


def sts_sentences(split: str = "train") -> list[str]:
    """Sentences (sentence1 and sentence2 columns) of one STS-benchmark split, file order.

    The files are tab separated without header (genre, file, year, id, score, s1, s2[, extra]);
    they contain stray quotes, so they are split on tabs rather than parsed as CSV.
    """
    out: list[str] = []
    with open(STS_DIR / f"sts-{split}.csv", encoding="utf-8") as fh:
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                continue
            out.extend(s.strip() for s in fields[5:7] if s.strip())
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _train_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 1,  # <mask> is appended afterwards
        special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>",
        max_piece_length=12,
        show_progress=False,
    )
    corpus = sts_sentences("train") + sts_sentences("dev")
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0",
        pair="<s>:0 $A:0 </s>:0 </s>:1 $B:1 </s>:1",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i, name in enumerate(SPECIAL_TOKENS):
        assert vocab[i][0] == name, (i, vocab[i])
    assert spec["model"]["unk_id"] == 3
    mask_id = len(vocab)
    vocab.append([MASK_TOKEN, 0.0])

    def added(i: int, content: str) -> dict:
        return {
            "id": i,
            "content": content,
            "single_word": False,
            "lstrip": content == MASK_TOKEN,  # as in XLM-R: "<mask>" absorbs the space before it
            "rstrip": False,
            "normalized": False,
            "special": True,
        }

    spec["added_tokens"] = [added(i, name) for i, name in enumerate(SPECIAL_TOKENS)] + [
        added(mask_id, MASK_TOKEN)
    ]
    spec["normalizer"] = None
    spec["truncation"] = None
    spec["padding"] = None
    text = json.dumps(spec, ensure_ascii=False)
    check = Tokenizer.from_str(text)  # must round-trip
    assert check.get_vocab_size(with_added_tokens=True) == vocab_size, check.get_vocab_size()
    assert check.token_to_id(MASK_TOKEN) == vocab_size - 1
    return text


def tokenizer_json(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """The (cached) ``tokenizer.json`` text of the tiny XLM-R-like tokenizer."""
    if vocab_size not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[vocab_size] = _train_tokenizer_json(vocab_size)
    return _TOKENIZER_CACHE[vocab_size]


def _tokenizer_config() -> dict:
    def tok(content: str) -> dict:
        return {
            "content": content,
            "lstrip": content == MASK_TOKEN,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": MASK_TOKEN,
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": {str(i): tok(name) for i, name in enumerate(SPECIAL_TOKENS)},
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": {
            "content": MASK_TOKEN,
            "lstrip": True,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }


# --------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------


def matryoshka_dims(hidden: int) -> list[int]:
    dims = [d for d in (4, 8, 16, 32, 64, 128, 256, 512, 768) if d < hidden]
    return [*dims, hidden]


def make_config(*, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return {
        "_name_or_path": "jinaai/jina-embeddings-v3",
        "architectures": ["XLMRobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "auto_map": {
            "AutoConfig": "jinaai/xlm-roberta-flash-implementation--configuration_xlm_roberta.XLMRobertaFlashConfig",
            "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA",
            "AutoModelForMaskedLM": "jinaai/xlm-roberta-flash-implementation--modeling_xlm_roberta.XLMRobertaForMaskedLM",
            "AutoModelForPreTraining": "jinaai/xlm-roberta-flash-implementation--modeling_xlm_roberta.XLMRobertaForPreTraining",
        },
        "bos_token_id": 0,
        "classifier_dropout": None,
        "emb_pooler": None,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "load_trained_adapters": True,
        "lora_adaptations": list(TASKS),
        "lora_alpha": LORA_ALPHA,
        "lora_dropout_p": 0.0,
        "lora_main_params_trainable": False,
        "lora_rank": LORA_RANK,
        "matryoshka_dimensions": matryoshka_dims(hidden),
        "max_position_embeddings": 8194,
        "model_type": "xlm-roberta",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "output_past": True,
        "pad_token_id": 1,
        "position_embedding_type": "rotary",
        "rotary_emb_base": 20000.0,
        "task_instructions": dict(TASK_INSTRUCTIONS),
        "torch_dtype": "bfloat16",
        "truncate_dim": None,
        "type_vocab_size": 1,
        "use_cache": True,
        "use_flash_attn": True,
        "vocab_size": vocab_size,
    }


def expected_key_count(layers: int) -> int:
    return 6 + 2 + layers * 20 + 4


def make_state_dict(
    *, seed: int, vocab_size: int, hidden: int, layers: int, intermediate: int
) -> dict[str, torch.Tensor]:
    """Random float32 weights with the published key names/shapes (spec §2.3), scaled down."""
    g = torch.Generator().manual_seed(seed)
    n_tasks, r = len(TASKS), LORA_RANK

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()

    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, out_f: int, in_f: int, std: float | None = None) -> None:
        # ~1/sqrt(fan_in) keeps activations O(1) so attention patterns (and RoPE) really matter
        std = (1.0 / in_f**0.5) if std is None else std
        sd[f"{name}.parametrizations.weight.original"] = randn(out_f, in_f, std=std)
        sd[f"{name}.parametrizations.weight.0.lora_A"] = randn(n_tasks, r, in_f, std=0.3)
        sd[f"{name}.parametrizations.weight.0.lora_B"] = randn(n_tasks, out_f, r, std=0.3)
        sd[f"{name}.bias"] = randn(out_f, std=0.05)

    def embedding(name: str, num: int, dim: int) -> None:
        sd[f"{name}.parametrizations.weight.original"] = randn(num, dim, std=0.1)
        sd[f"{name}.parametrizations.weight.0.lora_A"] = randn(n_tasks, num, r, std=0.3)
        sd[f"{name}.parametrizations.weight.0.lora_B"] = randn(n_tasks, r, dim, std=0.3)

    def layer_norm(name: str) -> None:
        sd[f"{name}.weight"] = 1.0 + randn(hidden, std=0.1)
        sd[f"{name}.bias"] = randn(hidden, std=0.05)

    p = "roberta."
    embedding(p + "embeddings.word_embeddings", vocab_size, hidden)
    embedding(p + "embeddings.token_type_embeddings", 1, hidden)
    layer_norm(p + "emb_ln")
    for i in range(layers):
        lp = f"{p}encoder.layers.{i}."
        # larger Q/K weights -> peaked attention, so position (RoPE) errors show in the output
        linear(lp + "mixer.Wqkv", 3 * hidden, hidden, std=2.0 / hidden**0.5)
        linear(lp + "mixer.out_proj", hidden, hidden)
        layer_norm(lp + "norm1")
        linear(lp + "mlp.fc1", intermediate, hidden)
        linear(lp + "mlp.fc2", hidden, intermediate)
        layer_norm(lp + "norm2")
    linear(p + "pooler.dense", hidden, hidden)
    return sd


def make_tiny_jina(
    path: Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
) -> Path:
    """Write a tiny random jina-embeddings-v3 checkpoint directory at ``path``; return ``path``."""
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden={hidden} must split into {heads} heads of even size (RoPE)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok_text = tokenizer_json(DEFAULT_VOCAB_SIZE)
    vocab_size = DEFAULT_VOCAB_SIZE
    (path / "tokenizer.json").write_text(tok_text, encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(
        json.dumps(_special_tokens_map(), indent=2), encoding="utf-8"
    )

    config = make_config(
        vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate
    )
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    sd = make_state_dict(
        seed=seed, vocab_size=vocab_size, hidden=hidden, layers=layers, intermediate=intermediate
    )
    assert len(sd) == expected_key_count(layers), (len(sd), expected_key_count(layers))
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
