"""The synthetic files' makers, under the name the tests import them by: they live in the package
(:mod:`cfdeploy.samples.official`), where ``cfdeploy samples`` writes the same files for users."""

from cfdeploy.samples.official import (
    FIVE_POINTS,
    arcface_state,
    cfclip_checkpoint,
    cfclip_keys,
    checkpoint_with_generator_of,
    clip_text_state,
    dac_image,
    e4e_checkpoint,
    manifest,
    rosinality_checkpoint,
    save_torchscript_archive,
    write_photos,
)

__all__ = [
    "FIVE_POINTS",
    "arcface_state",
    "cfclip_checkpoint",
    "cfclip_keys",
    "checkpoint_with_generator_of",
    "clip_text_state",
    "dac_image",
    "e4e_checkpoint",
    "manifest",
    "rosinality_checkpoint",
    "save_torchscript_archive",
    "write_photos",
]
