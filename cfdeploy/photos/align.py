"""The FFHQ-style face crop e4e was trained on, as a pure function of landmark points.

This follows e4e's ``utils/alignment.py`` ``align_face`` step by step (itself the FFHQ dataset's
recipe), with the image and the landmarks passed in instead of a path and a dlib predictor:

1. an oriented square (``quad``) from the eye centres and the mouth corners;
2. shrink: when the square is over twice the output size, the image is first downscaled by an integer
   factor (Pillow's LANCZOS, which the removed ``ANTIALIAS`` was an alias of);
3. crop to the square plus a border;
4. pad: where the square leaves the image, reflect-pad, blur the padding and fade it toward the
   per-channel median (the gaussian blur is scipy's ``gaussian_filter``, computed here in numpy);
5. sample the square with Pillow's QUAD transform (BILINEAR) and resize to the output size.

Only four points enter: the means of dlib's eye contours 36–41 and 42–47 and the mouth corners 48 and
54 of a 68-point set, or the eyes and mouth corners of a 5-point set in the RetinaFace/SCRFD order
(left eye, right eye, nose, left mouth corner, right mouth corner). "Left" is the eye on the image's
left in an upright face (the subject's right eye), as in both conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError

E4E_SIZE = 256  # the official function's output_size and transform_size
EYE_LEFT_68, EYE_RIGHT_68, MOUTH_LEFT_68, MOUTH_RIGHT_68 = slice(36, 42), slice(42, 48), 48, 54
EYE_LEFT_5, EYE_RIGHT_5, MOUTH_LEFT_5, MOUTH_RIGHT_5 = 0, 1, 3, 4
MIN_FACE_SIZE = 8  # pixels of the square's side; below ~2 the padding's blend divides by zero
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, which the official call uses


@dataclass(frozen=True, eq=False)  # compared by identity: numpy fields have no single truth value
class AlignedFace:
    """The crop and the transform that made it, enough to record and to reproduce it.

    ``quad`` is the sampled square in source pixels, corners in the official order (top-left,
    bottom-left, bottom-right, top-right of the aligned crop): output pixel (u, v) of a
    ``transform_size`` crop samples the bilinear interpolation of the corners at (u/size, v/size).
    ``shrink``, ``crop_box`` (in the shrunk image) and ``padding`` (left, top, right, bottom; zeros when
    the padding step did not run) are the intermediate steps, which change pixels but not the geometry,
    except for the shrunk image's exact scale, which ``source_size`` (the photo's width and height) gives.
    """

    image: Image.Image
    quad: np.ndarray
    shrink: int
    crop_box: tuple[int, int, int, int]
    padding: tuple[int, int, int, int]
    output_size: int
    transform_size: int
    source_size: tuple[int, int]

    def transform_record(self) -> dict[str, Any]:
        """The alignment transform as JSON-ready values, for an index file."""
        return {
            "quad": [[float(x), float(y)] for x, y in self.quad],
            "shrink": self.shrink,
            "crop_box": list(self.crop_box),
            "padding": list(self.padding),
            "output_size": self.output_size,
            "transform_size": self.transform_size,
            "source_size": list(self.source_size),
        }


def alignment_points(landmarks: np.ndarray) -> np.ndarray:
    """The four points the geometry uses, ``[4, 2]``: left eye, right eye, left and right mouth corners."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (68, 2):
        return np.stack(
            [
                points[EYE_LEFT_68].mean(axis=0),
                points[EYE_RIGHT_68].mean(axis=0),
                points[MOUTH_LEFT_68],
                points[MOUTH_RIGHT_68],
            ]
        )
    if points.shape == (5, 2):
        return points[[EYE_LEFT_5, EYE_RIGHT_5, MOUTH_LEFT_5, MOUTH_RIGHT_5]]
    raise ValueError(f"landmarks must be [68,2] or [5,2], got {list(points.shape)}")


def face_frame(landmarks: np.ndarray, source: str = "landmarks") -> tuple[np.ndarray, float]:
    """The oriented square the crop samples, ``[4, 2]`` in source pixels, and its side ``qsize``.

    Refuses, naming ``source``, points that are mirrored (left and right swapped, which would give a
    mirrored crop), collinear, not finite, or that span a square under ``MIN_FACE_SIZE`` pixels.
    """
    eye_left, eye_right, mouth_left, mouth_right = alignment_points(landmarks)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    if not eye_to_eye[0] * eye_to_mouth[1] - eye_to_eye[1] * eye_to_mouth[0] > 0:
        raise CfdeployError(
            f"{source}: the eye and mouth points are mirrored, collinear or not finite (left and right swapped?)"
        )
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    centre = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])
    qsize = float(np.hypot(*x) * 2)
    if not qsize >= MIN_FACE_SIZE:
        raise CfdeployError(
            f"{source}: the face spans {qsize:.1f} pixels, under the {MIN_FACE_SIZE} an alignment needs"
        )
    return quad, qsize


def align_face(
    image: Image.Image,
    landmarks: np.ndarray,
    output_size: int = E4E_SIZE,
    transform_size: int = E4E_SIZE,
    source: str = "landmarks",
) -> AlignedFace:
    """The aligned crop of the face whose ``landmarks`` ([68,2] or [5,2], pixels of ``image``) are given.

    ``image`` must be RGB. ``source`` names the photo in the error for unusable points.
    """
    if image.mode != "RGB":
        raise ValueError(f"align_face needs an RGB image, got mode {image.mode}")
    source_quad, qsize = face_frame(landmarks, source)
    quad = source_quad.copy()
    source_size = image.size

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        shrunk_size = (int(np.rint(image.size[0] / shrink)), int(np.rint(image.size[1] / shrink)))
        image = image.resize(shrunk_size, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink
    else:
        shrink = 1

    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top, right, bottom = _bounds(quad)
    crop_box = (
        max(left - border, 0),
        max(top - border, 0),
        min(right + border, image.size[0]),
        min(bottom + border, image.size[1]),
    )
    if crop_box[2] - crop_box[0] < image.size[0] or crop_box[3] - crop_box[1] < image.size[1]:
        image = image.crop(crop_box)
        quad -= crop_box[0:2]

    left, top, right, bottom = _bounds(quad)
    padding = (
        max(border - left, 0),
        max(border - top, 0),
        max(right - image.size[0] + border, 0),
        max(bottom - image.size[1] + border, 0),
    )
    if max(padding) > border - 4:
        least = int(np.rint(qsize * 0.3))
        padding = (max(padding[0], least), max(padding[1], least), max(padding[2], least), max(padding[3], least))
        image = _pad_with_blurred_reflection(image, padding, sigma=qsize * 0.02)
        quad += padding[0:2]
    else:
        padding = (0, 0, 0, 0)

    image = image.transform(
        (transform_size, transform_size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR
    )
    if output_size < transform_size:
        image = image.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return AlignedFace(image, source_quad, shrink, crop_box, padding, output_size, transform_size, source_size)


def _bounds(quad: np.ndarray) -> tuple[int, int, int, int]:
    """The quad's integer bounding box: floor of the minima, ceiling of the maxima."""
    return (
        int(np.floor(quad[:, 0].min())),
        int(np.floor(quad[:, 1].min())),
        int(np.ceil(quad[:, 0].max())),
        int(np.ceil(quad[:, 1].max())),
    )


def _pad_with_blurred_reflection(image: Image.Image, padding: tuple[int, int, int, int], sigma: float) -> Image.Image:
    """Reflect-pad, then blend the padding toward its blur and, further out, toward the median colour."""
    left, top, right, bottom = padding
    pixels = np.pad(np.asarray(image, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
    height, width, _ = pixels.shape
    rows, columns, _ = np.ogrid[:height, :width, :1]
    # 0 at the original image's edge (less inside it), rising to 1 at the padded image's outer edge.
    mask = np.maximum(
        1.0 - np.minimum(columns / left, (width - 1 - columns) / right),
        1.0 - np.minimum(rows / top, (height - 1 - rows) / bottom),
    )
    pixels += (gaussian_blur(pixels, sigma) - pixels) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels), 0, 255)), "RGB")


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(pixels, [sigma, sigma, 0])`` for float32 ``[H, W, C]``, in numpy.

    The same kernel (truncated at 4 sigma, normalised), the same boundary (scipy's "reflect": the edge
    sample repeated, numpy's "symmetric") and the same float32 rounding after each axis. Each axis is
    convolved through the FFT, which for the large kernels of big faces is many times faster than
    summing the taps and differs from the sum by ~1e-12 of the pixel range.
    """
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets.astype(np.float64) ** 2)
    kernel /= kernel.sum()
    blurred = pixels
    for axis in (0, 1):
        blurred = _convolve_axis(blurred, kernel, radius, axis).astype(np.float32)
    return blurred


def _convolve_axis(values: np.ndarray, kernel: np.ndarray, radius: int, axis: int) -> np.ndarray:
    length = values.shape[axis]
    widths = [(0, 0)] * values.ndim
    widths[axis] = (radius, radius)
    extended = np.pad(values.astype(np.float64), widths, "symmetric")
    size = _fft_friendly_size(extended.shape[axis])
    kernel_shape = [1] * values.ndim
    kernel_shape[axis] = size // 2 + 1
    spectrum = np.fft.rfft(extended, n=size, axis=axis) * np.fft.rfft(kernel, n=size).reshape(kernel_shape)
    convolved = np.fft.irfft(spectrum, n=size, axis=axis)
    # The kernel starts at tap -radius, so output sample i sits at index i + 2*radius of the convolution.
    return np.take(convolved, np.arange(2 * radius, 2 * radius + length), axis=axis)


def _fft_friendly_size(length: int) -> int:
    """The smallest 2^a 3^b 5^c >= ``length`` (numpy's FFT is slow for lengths with large prime factors)."""
    best = 1 << (length - 1).bit_length()
    power_of_five = 1
    while power_of_five < best:
        odd_factor = power_of_five  # 3^b 5^c; the smallest power of two that completes it is found directly
        while odd_factor < best:
            best = min(best, odd_factor << ((length - 1) // odd_factor).bit_length())
            odd_factor *= 3
        power_of_five *= 5
    return best
