"""A table of tiny, randomly initialised transformers models, one factory per architecture.

Every model is built from a config (never downloaded), with hidden size 32, 2-3 blocks and a vocabulary
of 128 tokens, under a fixed seed, in fp32 and eval mode, so the whole table builds in about a second
on two CPU cores. Each factory returns ``(model, info)``; :class:`ModelInfo` records what the tests expect of the
model (its language-tower stack path as discovered on *that* model class, its block count, whether
it is an encoder or a decoder, ...) and makes a small padded input batch.

Use :func:`build` (``build("llama-lm")``) or iterate over :data:`CASES` / :data:`TINY_MODELS`;
:data:`INFOS` holds the (static) infos without building anything, and :func:`cases` filters ids.
Factories always build a fresh model: PEFT wraps models in place, so tests that add adapters must
not share one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# transformers and its model classes are imported inside the factories, so that importing this
# table (e.g. during pytest collection) stays cheap.

HIDDEN = 32
HEADS = 2
INTERMEDIATE = 64
VOCAB = 128
MAX_POS = 64
SEED = 0

# Special token ids, kept below ``LOW_TOKEN`` so that the random "real" tokens never collide with
# them (RoBERTa derives position ids from ``input_ids != pad_token_id``).
PAD, BOS, EOS = 0, 1, 2
LOW_TOKEN = 5


@dataclass(frozen=True)
class ModelInfo:
    """What the tests expect of one tiny model."""

    #: table id, e.g. ``"llama-lm"`` (used as the pytest id)
    name: str
    #: architecture family, e.g. ``"llama"`` (shared by a bare model and its head model)
    arch: str
    #: ``config.model_type`` of the top-level model
    model_type: str
    #: the model class, e.g. ``"LlamaForCausalLM"``
    model_class: str
    #: ``"base"`` (AutoModel), ``"causal_lm"``, ``"seq_cls"`` or ``"vlm"`` (image-text-to-text)
    head: str
    #: dotted path of the language-tower block ``ModuleList`` from the model root
    layers_path: str
    #: number of language-tower blocks
    num_layers: int
    #: class name of one language-tower block
    block_class: str
    #: ``"encoder"`` (bidirectional, first-token pooling) or ``"decoder"`` (causal, last-token pooling)
    kind: str
    #: short explicit ``target_modules`` list (the attention query/value projections, or the fused QKV)
    qv_targets: tuple[str, ...]
    #: dotted path of the norm applied after the last block, ``None`` when there is none
    final_norm: str | None
    #: whether ``model(..., output_hidden_states=True)`` returns per-block hidden states
    supports_hidden_states: bool = True
    #: for head models: the table id of the bare base model of the same architecture
    base_name: str | None = None
    #: vision tower (VLMs only)
    vision_layers_path: str | None = None
    num_vision_layers: int | None = None
    #: the config's vocabulary size; random tokens are drawn from ``[LOW_TOKEN, token_high)``
    vocab_size: int = VOCAB
    token_high: int = VOCAB
    #: whether the model takes ``token_type_ids`` (BERT-style segment embeddings)
    token_type_ids: bool = False
    #: default side on which batches are padded
    padding_side: str = "right"
    #: id written at padded positions
    pad_token_id: int = PAD
    #: extra notes (free text, shown nowhere; for readers of the table)
    notes: str = field(default="", compare=False)

    @property
    def is_encoder(self) -> bool:
        return self.kind == "encoder"

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    @property
    def is_vlm(self) -> bool:
        return self.vision_layers_path is not None

    @property
    def default_pooling(self) -> str:
        return "cls" if self.is_encoder else "last"

    def make_batch(
        self,
        batch_size: int = 3,
        seq_len: int = 8,
        *,
        padding_side: str | None = None,
        seed: int = 1,
    ) -> dict[str, torch.Tensor]:
        """A small padded batch: ``input_ids``, ``attention_mask`` (1 = real token) and, where the
        model has segment embeddings, ``token_type_ids``.

        Sample 0 is unpadded; the others are padded (to lengths ``seq_len - 3``, ``seq_len - 5``,
        ...; at least 2 real tokens), on ``padding_side`` (the model's default when ``None``).
        """
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(LOW_TOKEN, self.token_high, (batch_size, seq_len), generator=generator)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        for row in range(1, batch_size):
            length = max(2, seq_len - 1 - 2 * row)
            if side == "right":
                mask[row, length:] = 0
            else:
                mask[row, : seq_len - length] = 0
        input_ids = input_ids.masked_fill(mask == 0, self.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.token_type_ids:
            # Two segments: the second half of every sequence is segment 1; padding is segment 0.
            types = torch.zeros_like(input_ids)
            types[:, seq_len // 2 :] = 1
            batch["token_type_ids"] = types * mask
        return batch



# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

_SPECIAL = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}


def _encoder_common(**overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **_SPECIAL,
    )
    common.update(overrides)
    return common


def _decoder_common(**overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        **_SPECIAL,
    )
    common.update(overrides)
    return common


def _bert_config():
    from transformers import BertConfig

    return BertConfig(**_encoder_common(type_vocab_size=2))


def _roberta_config():
    from transformers import RobertaConfig

    # RoBERTa derives position ids from input_ids != pad_token_id, offset by pad_token_id + 1.
    return RobertaConfig(**_encoder_common(type_vocab_size=1, max_position_embeddings=MAX_POS + 2))


def _deberta_v2_config():
    from transformers import DebertaV2Config

    # DeBERTa-v3 checkpoints use this model type: relative attention with log position buckets,
    # disentangled p2c/c2p attention, no absolute position embeddings.
    return DebertaV2Config(
        **_encoder_common(
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
        )
    )


def _distilbert_config():
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=3, n_heads=HEADS, hidden_dim=INTERMEDIATE,
        max_position_embeddings=MAX_POS, dropout=0.0, attention_dropout=0.0, pad_token_id=PAD,
    )


def _electra_config():
    from transformers import ElectraConfig

    # embedding_size != hidden_size: ELECTRA projects the embeddings up before the encoder.
    return ElectraConfig(**_encoder_common(embedding_size=16, type_vocab_size=2))


def _mpnet_config():
    from transformers import MPNetConfig

    return MPNetConfig(**_encoder_common(max_position_embeddings=MAX_POS + 2))


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=MAX_POS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_SPECIAL,
    )


def _gpt_neox_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS, rotary_pct=0.5,
        use_parallel_residual=True, tie_word_embeddings=False, **_SPECIAL,
    )


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS, ffn_dim=INTERMEDIATE,
        max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0,
        do_layer_norm_before=True, **_SPECIAL,
    )


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder_common())


def _mistral_config():
    from transformers import MistralConfig

    return MistralConfig(**_decoder_common(sliding_window=4))


def _gemma_config():
    from transformers import GemmaConfig

    return GemmaConfig(**_decoder_common(head_dim=16))


def _gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(**_decoder_common(head_dim=16, sliding_window=4, query_pre_attn_scalar=16))


def _gemma3_text_config():
    from transformers import Gemma3TextConfig

    # Sliding and full attention layers mixed, as in the real checkpoints.
    return Gemma3TextConfig(
        **_decoder_common(
            head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    )


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder_common())


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(**_decoder_common(head_dim=16))


def _phi3_config():
    from transformers import Phi3Config

    return Phi3Config(**_decoder_common())


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(**_decoder_common(num_local_experts=4, num_experts_per_tok=2))


LLAVA_IMAGE_TOKEN = VOCAB - 1  # kept out of the random text tokens (token_high = VOCAB - 1)
LLAVA_IMAGE_TOKENS_PER_IMAGE = 4  # 16×16 image, 8×8 patches, CLS dropped
GEMMA3_IMAGE_TOKEN, GEMMA3_BOI, GEMMA3_EOI = VOCAB - 3, VOCAB - 2, VOCAB - 1


def _llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    # Both towers have 3 blocks and both name their stack "...layers", so neither a path suffix
    # nor the block count tells them apart: only the tower does.
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3, num_attention_heads=HEADS,
        image_size=16, patch_size=8, projection_dim=HIDDEN,
    )
    text = LlamaConfig(**_decoder_common())
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )


def _gemma3_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(**_decoder_common(head_dim=16, sliding_window=4, query_pre_attn_scalar=16))
    vision = SiglipVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=HEADS,
        image_size=16, patch_size=4,
    )
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=GEMMA3_IMAGE_TOKEN, boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI,
    )


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_AUTO_CLASS = {
    "base": "AutoModel",
    "seq_cls": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "vlm": "AutoModelForImageTextToText",
}

_CONFIGS: dict[str, Callable[[], object]] = {}
INFOS: dict[str, ModelInfo] = {}


def _add(name: str, config: Callable[[], object], **info) -> None:
    INFOS[name] = ModelInfo(name=name, **info)
    _CONFIGS[name] = config


def _encoder(name, arch, model_type, config, model_class, head, prefix, stack, block_class, qv, **extra):
    _add(
        name, config, arch=arch, model_type=model_type, model_class=model_class, head=head,
        layers_path=("" if head == "base" else prefix + ".") + stack, num_layers=3, block_class=block_class,
        kind="encoder", qv_targets=qv, final_norm=None, padding_side="right", **extra,
    )


def _decoder(name, arch, model_type, config, model_class, head, prefix, stack, block_class, final_norm,
             qv=("q_proj", "v_proj"), **extra):
    root = "" if head == "base" else prefix + "."
    _add(
        name, config, arch=arch, model_type=model_type, model_class=model_class, head=head,
        layers_path=root + stack, num_layers=3, block_class=block_class, kind="decoder", qv_targets=qv,
        final_norm=root + final_norm, padding_side="left", **extra,
    )


def _vlm(name, arch, model_type, config, model_class, head, block_class, num_vision_layers, token_high, **extra):
    root = "" if head == "base" else "model."
    _add(
        name, config, arch=arch, model_type=model_type, model_class=model_class, head=head,
        layers_path=root + "language_model.layers", num_layers=3, block_class=block_class, kind="decoder",
        qv_targets=("q_proj", "v_proj"), final_norm=root + "language_model.norm", padding_side="left",
        vision_layers_path=root + "vision_tower.encoder.layers", num_vision_layers=num_vision_layers,
        token_high=token_high, **extra,
    )


_QV_BERT = ("query", "value")

# encoders ------------------------------------------------------------------------------------
_encoder("bert", "bert", "bert", _bert_config, "BertModel", "base", "bert", "encoder.layer", "BertLayer", _QV_BERT,
         token_type_ids=True)
_encoder("bert-seqcls", "bert", "bert", _bert_config, "BertForSequenceClassification", "seq_cls", "bert",
         "encoder.layer", "BertLayer", _QV_BERT, token_type_ids=True, base_name="bert")
_encoder("roberta", "roberta", "roberta", _roberta_config, "RobertaModel", "base", "roberta", "encoder.layer",
         "RobertaLayer", _QV_BERT)
_encoder("deberta-v2", "deberta-v2", "deberta-v2", _deberta_v2_config, "DebertaV2Model", "base", "deberta",
         "encoder.layer", "DebertaV2Layer", ("query_proj", "value_proj"),
         notes="DeBERTa-v3 checkpoints use model_type deberta-v2")
_encoder("deberta-v2-seqcls", "deberta-v2", "deberta-v2", _deberta_v2_config, "DebertaV2ForSequenceClassification",
         "seq_cls", "deberta", "encoder.layer", "DebertaV2Layer", ("query_proj", "value_proj"), base_name="deberta-v2")
_encoder("distilbert", "distilbert", "distilbert", _distilbert_config, "DistilBertModel", "base", "distilbert",
         "transformer.layer", "TransformerBlock", ("q_lin", "v_lin"))
_encoder("electra", "electra", "electra", _electra_config, "ElectraForSequenceClassification", "seq_cls", "electra",
         "encoder.layer", "ElectraLayer", _QV_BERT, token_type_ids=True)
_encoder("mpnet", "mpnet", "mpnet", _mpnet_config, "MPNetModel", "base", "mpnet", "encoder.layer", "MPNetLayer",
         ("q", "v"))

# decoders ------------------------------------------------------------------------------------
_decoder("gpt2", "gpt2", "gpt2", _gpt2_config, "GPT2Model", "base", "transformer", "h", "GPT2Block", "ln_f",
         qv=("c_attn",), notes="Conv1D projections, fused QKV")
_decoder("gpt2-lm", "gpt2", "gpt2", _gpt2_config, "GPT2LMHeadModel", "causal_lm", "transformer", "h", "GPT2Block",
         "ln_f", qv=("c_attn",), base_name="gpt2")
_decoder("gpt-neox", "gpt-neox", "gpt_neox", _gpt_neox_config, "GPTNeoXForCausalLM", "causal_lm", "gpt_neox",
         "layers", "GPTNeoXLayer", "final_layer_norm", qv=("query_key_value",), notes="parallel residual, fused QKV")
_decoder("opt", "opt", "opt", _opt_config, "OPTForCausalLM", "causal_lm", "model", "decoder.layers",
         "OPTDecoderLayer", "decoder.final_layer_norm")
_decoder("llama", "llama", "llama", _llama_config, "LlamaModel", "base", "model", "layers", "LlamaDecoderLayer", "norm")
_decoder("llama-lm", "llama", "llama", _llama_config, "LlamaForCausalLM", "causal_lm", "model", "layers",
         "LlamaDecoderLayer", "norm", base_name="llama")
_decoder("mistral", "mistral", "mistral", _mistral_config, "MistralForCausalLM", "causal_lm", "model", "layers",
         "MistralDecoderLayer", "norm")
_decoder("gemma", "gemma", "gemma", _gemma_config, "GemmaForCausalLM", "causal_lm", "model", "layers",
         "GemmaDecoderLayer", "norm", notes="embeddings scaled by sqrt(hidden)")
_decoder("gemma2", "gemma2", "gemma2", _gemma2_config, "Gemma2ForCausalLM", "causal_lm", "model", "layers",
         "Gemma2DecoderLayer", "norm")
_decoder("gemma3-text", "gemma3", "gemma3_text", _gemma3_text_config, "Gemma3ForCausalLM", "causal_lm", "model",
         "layers", "Gemma3DecoderLayer", "norm")
_decoder("qwen2", "qwen2", "qwen2", _qwen2_config, "Qwen2Model", "base", "model", "layers", "Qwen2DecoderLayer", "norm")
_decoder("qwen2-lm", "qwen2", "qwen2", _qwen2_config, "Qwen2ForCausalLM", "causal_lm", "model", "layers",
         "Qwen2DecoderLayer", "norm", base_name="qwen2")
_decoder("qwen3", "qwen3", "qwen3", _qwen3_config, "Qwen3ForCausalLM", "causal_lm", "model", "layers",
         "Qwen3DecoderLayer", "norm")
_decoder("phi3", "phi3", "phi3", _phi3_config, "Phi3ForCausalLM", "causal_lm", "model", "layers", "Phi3DecoderLayer",
         "norm", qv=("qkv_proj",), notes="fused QKV and gate_up projections")
_decoder("mixtral", "mixtral", "mixtral", _mixtral_config, "MixtralModel", "base", "model", "layers",
         "MixtralDecoderLayer", "norm", notes="sparse MoE; experts are fused 3-D parameters in transformers 5")
_decoder("mixtral-lm", "mixtral", "mixtral", _mixtral_config, "MixtralForCausalLM", "causal_lm", "model", "layers",
         "MixtralDecoderLayer", "norm", base_name="mixtral")

# vision-language -----------------------------------------------------------------------------
_vlm("llava-base", "llava", "llava", _llava_config, "LlavaModel", "base", "LlamaDecoderLayer", 3, VOCAB - 1,
     notes="CLIP vision tower + Llama text")
_vlm("llava", "llava", "llava", _llava_config, "LlavaForConditionalGeneration", "vlm", "LlamaDecoderLayer", 3,
     VOCAB - 1, base_name="llava-base")
_vlm("gemma3-mm", "gemma3", "gemma3", _gemma3_config, "Gemma3ForConditionalGeneration", "vlm",
     "Gemma3DecoderLayer", 2, VOCAB - 3, notes="SigLIP vision tower + Gemma3 text")


def build(name: str) -> tuple[nn.Module, ModelInfo]:
    """A fresh ``(model, info)`` for table id ``name``: eval mode, fp32, seed :data:`SEED`."""
    import transformers

    try:
        info = INFOS[name]
    except KeyError:
        raise KeyError(f"no tiny model {name!r}; choose one of {', '.join(INFOS)}") from None
    torch.manual_seed(SEED)
    auto_class = getattr(transformers, _AUTO_CLASS[info.head])
    model = auto_class.from_config(_CONFIGS[name](), dtype=torch.float32)
    model.eval()
    return model, info


def _factory(name: str) -> Callable[[], tuple[nn.Module, ModelInfo]]:
    def factory() -> tuple[nn.Module, ModelInfo]:
        return build(name)

    factory.__name__ = "tiny_" + name.replace("-", "_")
    factory.__doc__ = f"Tiny random {INFOS[name].model_class} ({INFOS[name].notes or INFOS[name].arch})."
    return factory


#: table id -> factory returning a fresh ``(model, info)``
TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, ModelInfo]]] = {name: _factory(name) for name in INFOS}

#: table ids, in table order
CASES: list[str] = list(INFOS)


def cases(*, kind: str | None = None, head: str | None = None, vlm: bool | None = None,
          with_base: bool | None = None, arch: str | None = None) -> list[str]:
    """Table ids filtered by ``kind`` (encoder/decoder), ``head``, VLM-ness, having a bare base model
    in the table, or architecture family."""
    out = []
    for name, info in INFOS.items():
        if kind is not None and info.kind != kind:
            continue
        if head is not None and info.head != head:
            continue
        if vlm is not None and info.is_vlm != vlm:
            continue
        if with_base is not None and (info.base_name is not None) != with_base:
            continue
        if arch is not None and info.arch != arch:
            continue
        out.append(name)
    return out


def llava_image_batch(info: ModelInfo, batch_size: int = 2, seq_len: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LLaVA batch with one 16×16 image per sample (its 4 image tokens first, then text)."""
    if info.arch != "llava":
        raise ValueError(f"{info.name} is not a LLaVA model")
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(LOW_TOKEN, info.token_high, (batch_size, seq_len), generator=generator)
    image = torch.full((batch_size, LLAVA_IMAGE_TOKENS_PER_IMAGE), LLAVA_IMAGE_TOKEN)
    input_ids = torch.cat([image, text], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, 16, 16, generator=generator),
    }
