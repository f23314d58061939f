"""Photos in, encoder inputs out, without torch: reading, face landmarks, FFHQ-style alignment, preprocessing;
and the edited faces pasted back into their photos (:mod:`cfdeploy.photos.paste`).

numpy and Pillow only; dlib (the ``photos`` extra) is imported only by :class:`DlibLandmarks`.
"""

from cfdeploy.photos.align import AlignedFace, align_face, alignment_points, face_frame
from cfdeploy.photos.images import MAX_PHOTO_PIXELS, Photo, as_rgb, load_photo, photo_paths, read_photo
from cfdeploy.photos.landmarks import (
    DlibLandmarks,
    Face,
    NoFaceFound,
    largest_face,
    read_landmarks,
    select_faces,
)
from cfdeploy.photos.preprocess import ENCODER_SIZE, batch_inputs, encoder_input

__all__ = [
    "ENCODER_SIZE",
    "MAX_PHOTO_PIXELS",
    "AlignedFace",
    "DlibLandmarks",
    "Face",
    "NoFaceFound",
    "Photo",
    "align_face",
    "alignment_points",
    "as_rgb",
    "batch_inputs",
    "encoder_input",
    "face_frame",
    "largest_face",
    "load_photo",
    "photo_paths",
    "read_landmarks",
    "read_photo",
    "select_faces",
]
