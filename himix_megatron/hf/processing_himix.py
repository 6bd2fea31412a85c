"""HiMix processor for Hugging Face transformers (remote code): the vision tower's image processor (SigLIP's or
CLIP's) and the LM's tokenizer.

This file is copied verbatim next to exported weights, so it imports only transformers (and the standard library).

HiMix's image never enters the token sequence: it reaches every decoder layer as vision keys/values computed from
`pixel_values`. The chat template (`chat_template.jinja` in an export, written from the conversation template the
model was trained with) still writes one `<image>` placeholder per image, at the front of the user turn that holds
it, which is where training put the image. The processor uses the placeholders to pair texts with images and then
drops them, so `input_ids` are exactly the text tokens the model was trained on and `generate()` returns
`input_ids` followed by the new tokens (callers that cut the prompt off by its length, as eval harnesses do, get
the answer).

Text is encoded as training encodes it (himix_megatron.data.templates, which reproduces the HiMix authors' code):
the prompt cut at each `<image>`, each piece tokenized by the tokenizer as it stands (its BOS, its `legacy`
handling of text after special tokens), the BOS of every piece but the first dropped, the placeholders dropped.
The chat template writes no BOS: tokenizing the first piece adds it, as it did in training.

Batches are padded on the left by default (decoder-only generation), with the tokenizer's pad token, else its
EOS, else id 0; `attention_mask` hides them.
"""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image

IMAGE_TOKEN = "<image>"
_PADDING = {True: "longest", "longest": "longest", False: "do_not_pad", None: "do_not_pad",
            "do_not_pad": "do_not_pad", "max_length": "max_length"}
# Accepted for compatibility with callers that always pass them, as long as they ask for nothing.
_NOOP_KWARGS = {"truncation": (None, False, "do_not_truncate"), "return_token_type_ids": (None, False),
                "return_mm_token_type_ids": (None, False)}


def _load(image):
    return load_image(image) if isinstance(image, str) else image  # a path or URL, as lmms-eval may pass


class HiMixProcessor(ProcessorMixin):
    """`HiMixProcessor(image_processor, tokenizer, chat_template=None)`: pixel_values for the vision tower,
    input_ids / attention_mask for the text. One image per sample (or none in the whole batch)."""

    model_input_names = ["input_ids", "attention_mask", "pixel_values"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token=IMAGE_TOKEN,
                 padding_side="left", **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("HiMixProcessor needs both an image_processor and a tokenizer")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_token = image_token
        self.padding_side = padding_side
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # --- text ---------------------------------------------------------------------------------------------------

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one prompt as training made them (the HiMix authors' tokenization): the text cut at each
        `<image>`, every piece tokenized as `tokenizer(piece)` with the BOS of all but the first dropped, the
        image placeholders left out. The chat template writes no BOS, so `add_special_tokens` changes nothing
        unless the text already starts with the BOS string (then it is not added twice)."""
        tok = self.tokenizer
        bos = tok.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos):]
        ids: list = []
        strip_bos = False
        for k, piece in enumerate(text.split(self.image_token)):
            piece_ids = list(tok(piece, add_special_tokens=True)["input_ids"])
            if k == 0:
                strip_bos = bool(piece_ids) and piece_ids[0] == tok.bos_token_id
            elif strip_bos:
                piece_ids = piece_ids[1:]
            ids.extend(piece_ids)
        return ids

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for idx in (tok.pad_token_id, tok.eos_token_id):
            if isinstance(idx, int):
                return idx
            if isinstance(idx, (list, tuple)) and idx:
                return int(idx[0])
        return 0

    # --- the call -----------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, *, audios=None, padding=False,
                 padding_side=None, max_length=None, return_tensors=None, return_attention_mask=True,
                 add_special_tokens=False, images_kwargs=None, text_kwargs=None, **kwargs) -> BatchFeature:
        """input_ids, attention_mask (text) and pixel_values (images), as a BatchFeature.

        `text`: one string or a list, as the chat template renders them, with one `<image>` per image of that
        sample. HiMix takes one image per sample: every sample of a batch has one, or none has.
        `images`: one image (PIL, array, tensor, path or URL), a flat list in placeholder order, or one list per
        text. `videos` / `audio` / `audios`: the model has no such input; anything but None or an empty list is
        refused. `padding`: True / "longest" pads on `padding_side` (the processor's, "left" by default).
        """
        for name, value in (("videos", videos), ("audio", audio), ("audios", audios)):
            if value is not None and not (isinstance(value, (list, tuple)) and all(v is None for v in value)):
                raise ValueError(f"HiMix takes images and text only: {name} are not supported "
                                 "(the model has no video or audio input)")
        text_kwargs = dict(text_kwargs or {})
        text_kwargs.pop("return_tensors", None)
        padding = text_kwargs.pop("padding", padding)
        padding_side = text_kwargs.pop("padding_side", padding_side)
        max_length = text_kwargs.pop("max_length", max_length)
        add_special_tokens = text_kwargs.pop("add_special_tokens", add_special_tokens)
        unknown = sorted(k for k, v in {**kwargs, **text_kwargs}.items() if v not in _NOOP_KWARGS.get(k, (None,)))
        if unknown:
            raise TypeError(f"HiMixProcessor got unsupported arguments {unknown}")
        if text is None and images is None:
            raise ValueError("HiMixProcessor needs text, images or both")

        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if images is None:
            flat, nested = [], None
        elif not isinstance(images, (list, tuple)):
            flat, nested = [images], None
        elif any(isinstance(x, (list, tuple)) for x in images):
            nested = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
            nested = [[im for im in per if im is not None] for per in nested]
            flat = [im for per in nested for im in per]
        else:
            flat, nested = [im for im in images if im is not None], None
        data = {}
        if texts is not None:
            counts = [t.count(self.image_token) for t in texts]
            if nested is not None and [len(per) for per in nested] != counts:
                raise ValueError(f"each text needs one {self.image_token} per image it is given: placeholders "
                                 f"{counts}, images {[len(per) for per in nested]}")
            if sum(counts) != len(flat):
                raise ValueError(f"{sum(counts)} {self.image_token} placeholder(s) in the text but {len(flat)} "
                                 "image(s): give one image per placeholder (the chat template writes one for each "
                                 "image of a message)")
            if max(counts, default=0) > 1:
                raise ValueError(f"HiMix takes one image per sample; a text holds {max(counts)} "
                                 f"{self.image_token} placeholders")
            if flat and not all(counts):
                raise ValueError("HiMix needs an image for every sample of a batch that has images "
                                 f"(placeholders per text: {counts}); process those samples separately")
            data.update(self._encode_batch(texts, padding, padding_side, max_length, add_special_tokens,
                                           return_attention_mask))
        if flat:
            out = self.image_processor(images=[_load(im) for im in flat], return_tensors="pt", **(images_kwargs or {}))
            data["pixel_values"] = out["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_batch(self, texts, padding, padding_side, max_length, add_special_tokens, return_attention_mask):
        rows = [self.encode_text(t, add_special_tokens) for t in texts]
        if padding not in _PADDING:
            raise ValueError(f"padding must be True/'longest', False/'do_not_pad' or 'max_length', got {padding!r}")
        mode = _PADDING[padding]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = None
        if mode == "longest":
            target = max(len(r) for r in rows)
        elif mode == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
            if any(len(r) > max_length for r in rows):
                raise ValueError(f"a text has more than max_length={max_length} tokens (truncation is not "
                                 "supported: it would cut the prompt the model answers)")
        if target is None:
            masks = [[1] * len(r) for r in rows]
        else:
            pad = self._pad_id()
            masks, padded = [], []
            for r in rows:
                fill = target - len(r)
                padded.append([pad] * fill + r if side == "left" else r + [pad] * fill)
                masks.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
            rows = padded
        out = {"input_ids": rows}
        if return_attention_mask:
            out["attention_mask"] = masks
        return out

    # --- decoding -----------------------------------------------------------------------------------------------

    def batch_decode(self, *args, **kwargs):
        """The tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """The tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["HiMixProcessor"]
