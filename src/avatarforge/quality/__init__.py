"""Avatar quality: did the adapter capture the person, and did it leak them into every face?

- :mod:`.embedding`   the 128-d dlib face embedding (face-recognition-models, offline)
- :mod:`.metric`      distances to the user's kept photos, identity and leakage rates (pure)
- :mod:`.prompts`     the fixed, seeded prompt set: with the token and without it
- :mod:`.references`  the user's kept photos from the preprocessed dataset
- :mod:`.report`      report.json, and whether it measures anything (random bases do not)
- :mod:`.grid`        grid.png: the images with their scores written on them
- :mod:`.run`         :func:`evaluate`: generate, score, write

Nothing here prints: ``avatarforge eval`` (:mod:`avatarforge.cli.eval`) does.
"""

from .config import EvalConfig
from .embedding import THRESHOLD, FaceEmbedding, distance, embed_face
from .metric import IDENTITY, LEAKAGE, ImageScore, identity_distance, score_image, summarize
from .references import QualityError
from .report import EvalReport, random_base_reason
from .run import EvalResult, evaluate

__all__ = [
    "IDENTITY",
    "LEAKAGE",
    "THRESHOLD",
    "EvalConfig",
    "EvalReport",
    "EvalResult",
    "FaceEmbedding",
    "ImageScore",
    "QualityError",
    "distance",
    "embed_face",
    "evaluate",
    "identity_distance",
    "random_base_reason",
    "score_image",
    "summarize",
]
