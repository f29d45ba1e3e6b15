"""VTG evaluation: pure functions of predictions and ground truth (no torch, no ranks).

    timeexpert eval --task charades --pred P.jsonl --gt charades_sta_test.txt --out metrics.json

:mod:`.io` reads and writes the public formats, :mod:`.moment` scores Charades-STA style moment
retrieval, :mod:`.qvhighlights` QVHighlights as moment_detr does, :mod:`.dvc` dense captioning
(densevid / TRACE / SODA_c), :mod:`.cli` is the command. Definitions: docs/EVAL.md.
"""

from megatron_timeexpert.eval.io import (
    DenseVideo,
    EvalInputError,
    MomentPrediction,
    MomentQuery,
    write_dense_predictions,
    write_moment_predictions,
    write_qvhighlights_predictions,
)

__all__ = [
    "DenseVideo",
    "EvalInputError",
    "MomentPrediction",
    "MomentQuery",
    "write_dense_predictions",
    "write_moment_predictions",
    "write_qvhighlights_predictions",
]
