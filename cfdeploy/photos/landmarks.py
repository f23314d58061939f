"""Where the faces are: landmark points from a file, or from dlib's detector and 68-point predictor.

Both give, per photo, a list of :class:`Face` (points in the photo's pixels, after EXIF orientation,
and a box). The official e4e code keeps the *last* face dlib reports and crashes when there is none;
here the largest face is kept (or every face, when asked) and a photo without one is a
:class:`NoFaceFound` error, which a caller may catch to skip the photo instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError, missing_extra
from cfdeploy.files import read_npy, require_file

POINT_COUNTS = (68, 5)  # dlib's 68-point set; RetinaFace/SCRFD: left eye, right eye, nose, mouth left, mouth right
DLIB_MODEL_NAME = "shape_predictor_68_face_landmarks.dat"


class NoFaceFound(CfdeployError):
    """A photo in which no face was found (``--skip-missing`` catches this one)."""


@dataclass(frozen=True, eq=False)  # compared by identity: numpy fields have no single truth value
class Face:
    """One face: ``points`` float64 ``[68, 2]`` or ``[5, 2]`` (x, y pixels) and ``box`` (left, top, right, bottom).

    The box is the detector's, or the points' bounding box when the points came from a file.
    """

    points: np.ndarray
    box: tuple[float, float, float, float]

    @classmethod
    def from_points(cls, points: np.ndarray) -> Face:
        """A face known only by its points; its box bounds them."""
        low, high = points.min(axis=0), points.max(axis=0)
        return cls(points, (float(low[0]), float(low[1]), float(high[0]), float(high[1])))

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return (right - left) * (bottom - top)

    def record(self) -> dict[str, Any]:
        """The face as JSON-ready values, for an index file."""
        return {"box": list(self.box), "landmarks": self.points.tolist()}


def largest_face(faces: Sequence[Face]) -> Face:
    """The face with the largest box (the first of equals)."""
    return max(faces, key=lambda face: face.area)


def select_faces(
    faces: Sequence[Face], source: Path | str, all_faces: bool = False, *, size: tuple[int, int]
) -> list[Face]:
    """The faces inside the photo of ``size`` (width, height): every one when ``all_faces``, else the largest.

    A face counts when at least half its points lie in the photo; when none does, :class:`NoFaceFound` names
    ``source`` (aligning a face outside the photo would encode a crop of nothing but padding). A counted face
    whose points reach beyond one photo size around it is refused: no photo's face does, and its crop would
    be sized by the stray point, not by the face.
    """
    if not faces:
        raise NoFaceFound(f"{source}: no face found")
    width, height = size
    inside = [face for face in faces if _share_inside(face.points, width, height) >= 0.5]
    if not inside:
        raise NoFaceFound(
            f"{source}: no face inside the {width}x{height} photo (the landmarks of {len(faces)} face(s) lie outside it)"
        )
    for face in inside:
        low, high = face.points.min(axis=0), face.points.max(axis=0)
        if low[0] < -width or low[1] < -height or high[0] > 2 * width or high[1] > 2 * height:
            raise CfdeployError(
                f"{source}: a face's landmarks reach far outside the {width}x{height} photo "
                f"(x {low[0]:.4g} to {high[0]:.4g}, y {low[1]:.4g} to {high[1]:.4g})"
            )
    return inside if all_faces else [largest_face(inside)]


def _share_inside(points: np.ndarray, width: int, height: int) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(((x >= 0) & (x <= width) & (y >= 0) & (y <= height)).mean())


def read_landmarks(path: Path, photos: Sequence[Path]) -> list[list[Face]]:
    """The faces of each photo, from ``--landmarks FILE``: one entry per photo, in the order of ``photos``.

    ``.json``: a list whose entries are each one face (a list of [x, y] pairs) or a list of faces (an
    empty list: no face). ``.npy``: ``[N, P, 2]`` (one face per photo) or ``[N, F, P, 2]`` (F per photo).
    P is 68 (dlib's order) or 5 (RetinaFace/SCRFD's order). Points are (x, y) = (column, row) pixel
    coordinates as dlib and RetinaFace report them, in the photo as displayed (after its EXIF orientation).
    """
    require_file(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npy"):
        raise CfdeployError(f"{path}: landmarks must be a .json or .npy file, found suffix {suffix or '(none)'}")
    entries = _json_list(path) if suffix == ".json" else _npy_array(path)
    if len(entries) != len(photos):
        raise CfdeployError(
            f"{path}: {len(entries)} landmark entries for {len(photos)} photos (one entry per photo, in order)"
        )
    faces = []
    for index, (entry, photo) in enumerate(zip(entries, photos, strict=True)):
        where = f"{path}: entry {index} ({photo.name})"
        faces.append(faces_from_json(entry, where) if suffix == ".json" else _checked_faces(_npy_faces(entry), where))
    return faces


def faces_from_json(entry: Any, where: str) -> list[Face]:
    """One photo's faces from JSON: a face (a list of [x, y] pairs) or a list of faces; ``where`` names it in errors."""
    return _checked_faces(_json_faces(entry, where), where)


def _checked_faces(arrays: list[np.ndarray], where: str) -> list[Face]:
    return [
        _checked_face(points, f"{where}, face {number}" if len(arrays) > 1 else where)
        for number, points in enumerate(arrays)
    ]


def _checked_face(points: np.ndarray, where: str) -> Face:
    if points.ndim != 2 or points.shape[0] not in POINT_COUNTS or points.shape[1] != 2:
        raise CfdeployError(f"{where}: expected [68,2] or [5,2] points, found {list(points.shape)}")
    if not np.isfinite(points).all():
        raise CfdeployError(f"{where}: the points hold NaN or infinity")
    return Face.from_points(points)


def _npy_array(path: Path) -> np.ndarray:
    array = read_npy(path, "landmarks")
    if array.dtype.kind not in "iuf":
        raise CfdeployError(f"{path}: expected integer or floating-point landmarks, found dtype {array.dtype}")
    if array.ndim not in (3, 4):
        raise CfdeployError(
            f"{path}: expected landmarks [N,P,2] or [N,faces,P,2] (P = 68 or 5), found {list(array.shape)}"
        )
    return array.astype(np.float64)


def _npy_faces(entry: np.ndarray) -> list[np.ndarray]:
    """One photo's entry of an ``[N, P, 2]`` array is a face; of an ``[N, F, P, 2]`` array, F faces."""
    return [entry] if entry.ndim == 2 else list(entry)


def _json_list(path: Path) -> list[Any]:
    try:
        content = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise CfdeployError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, list):
        raise CfdeployError(f"{path}: expected a JSON list with one entry per photo, found {_shown(content)}")
    return content


def _json_faces(entry: Any, where: str) -> list[np.ndarray]:
    """One entry: a face (a list of [x, y] pairs) or a list of faces (empty: no face)."""
    if not isinstance(entry, list):
        raise CfdeployError(
            f"{where}: expected a face (a list of [x, y] pairs) or a list of faces, found {_shown(entry)}"
        )
    holds_faces = bool(entry) and isinstance(entry[0], list) and bool(entry[0]) and isinstance(entry[0][0], list)
    faces = entry if holds_faces else [entry] if entry else []
    for number, face in enumerate(faces):
        for point in face if isinstance(face, list) else [face]:
            if not _is_pair(point):
                label = f"{where}, face {number}" if holds_faces else where
                raise CfdeployError(f"{label}: expected [x, y] number pairs, found {_shown(point)}")
    return [np.array(face, dtype=np.float64).reshape(len(face), 2) for face in faces]


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(number) for number in value)


def _is_number(value: Any) -> bool:
    """A JSON number that a float64 holds (NaN and infinity included, refused later with their own message): an
    integer of hundreds of digits is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _shown(value: Any) -> str:
    """A JSON value as it would be written, cut to 40 characters (escapes keep it on one line)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class DlibLandmarks:
    """dlib's frontal HOG face detector with its 68-point shape predictor, as the official ``get_landmark``.

    ``model_path`` is dlib's ``shape_predictor_68_face_landmarks.dat``, which is never downloaded here.
    That model was trained on the iBUG 300-W data set, whose licence excludes commercial use.
    ``upsample`` is the detector's number of upsamplings (the official 1 finds faces down to ~40 px).
    """

    def __init__(self, model_path: Path, upsample: int = 1) -> None:
        try:
            import dlib  # type: ignore[import-untyped]  # dlib-bin ships no type information
        except ImportError as error:
            raise missing_extra("dlib", "--landmarks-model", error) from None
        require_file(model_path)
        try:
            predictor = dlib.shape_predictor(str(model_path))
        except RuntimeError as error:
            raise CfdeployError(f"{model_path}: not a dlib shape predictor ({' '.join(str(error).split())})") from None
        except MemoryError:  # dlib allocates what the file's header declares, before reading the values
            raise CfdeployError(
                f"{model_path}: not a dlib shape predictor (its header declares a matrix larger than memory)"
            ) from None
        parts = predictor(np.zeros((1, 1, 3), np.uint8), dlib.rectangle(0, 0, 0, 0)).num_parts
        if parts != 68:
            raise CfdeployError(
                f"{model_path}: a {parts}-point shape predictor; the alignment needs dlib's 68-point {DLIB_MODEL_NAME}"
            )
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = predictor
        self._upsample = upsample

    def faces(self, image: Image.Image) -> list[Face]:
        """Every face dlib finds in the RGB ``image``, in its order, with its 68 points and box."""
        if image.mode != "RGB":
            raise ValueError(f"DlibLandmarks needs an RGB image, got mode {image.mode}")
        pixels = np.asarray(image)
        faces = []
        for box in self._detector(pixels, self._upsample):
            shape = self._predictor(pixels, box)
            points = np.array([(part.x, part.y) for part in shape.parts()], dtype=np.float64)
            faces.append(Face(points, (float(box.left()), float(box.top()), float(box.right()), float(box.bottom()))))
        return faces
