"""Segment Anything (SAM) in Flax NNX: image encoder, prompt encoder, mask decoder."""

from prima_jax.models.sam.image_encoder import SamImageEncoder
from prima_jax.models.sam.mask_decoder import SamMaskDecoder
from prima_jax.models.sam.prompt_encoder import SamPromptEncoder
from prima_jax.models.sam.sam import Sam, postprocess_masks, resize_bilinear, upscale_masks

__all__ = ["Sam", "SamImageEncoder", "SamMaskDecoder", "SamPromptEncoder", "postprocess_masks",
           "resize_bilinear", "upscale_masks"]
