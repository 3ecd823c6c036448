"""What scoring leaves in the store for selection and hand-off: per-item scores (every scored
item's top probability, predicted class, margin, entropy, expected focal loss) and each chunk's
candidates (ids, strategy scores, probabilities, embeddings), as Parquet."""

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from services.selection.candidates import Candidates


def per_item_scores(
    item_ids: NDArray[np.int64],
    probs: NDArray[np.float32],
    gamma: float,
    labels: Sequence[str],
    model_version: int,
) -> pa.Table:
    """Per-item scores: max prob, predicted class, margin, entropy, expected focal loss."""
    clipped = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    top2 = -np.sort(-probs, axis=1)[:, :2]
    predicted = probs.argmax(axis=1)
    return pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "max_prob": pa.array(top2[:, 0], pa.float32()),
            "predicted_class": pa.array(predicted, pa.int32()),
            "predicted_label": pa.array([labels[i] for i in predicted], pa.string()),
            "margin": pa.array(top2[:, 0] - top2[:, 1], pa.float32()),
            "entropy": pa.array(-(clipped * np.log(clipped)).sum(axis=1), pa.float32()),
            "expected_focal": pa.array(
                (clipped * (1 - clipped) ** gamma * -np.log(clipped)).sum(axis=1), pa.float32()
            ),
            "model_version": pa.array(np.full(len(item_ids), model_version), pa.int32()),
        }
    )


def candidates_to_table(candidates: Candidates) -> pa.Table:
    n, c = candidates.probs.shape
    d = candidates.embeddings.shape[1]
    return pa.table(
        {
            "item_id": pa.array(candidates.item_ids, pa.int64()),
            "score": pa.array(candidates.scores, pa.float32()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(candidates.probs.ravel()), c),
            "embeddings": pa.FixedSizeListArray.from_arrays(
                pa.array(candidates.embeddings.ravel(), pa.float32()), d
            )
            if d
            else pa.array([[]] * n, pa.list_(pa.float32())),
        }
    )


def candidates_from_table(table: pa.Table) -> Candidates:
    n = table.num_rows

    def matrix(name: str) -> NDArray[np.float32]:
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        shaped = values.reshape(n, -1) if n else values.reshape(0, 0)
        return np.asarray(shaped, dtype=np.float32)

    return Candidates(
        table["item_id"].to_numpy().astype(np.int64),
        matrix("probs"),
        matrix("embeddings"),
        table["score"].to_numpy().astype(np.float32),
    )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    # Measured on a 2,048-candidate chunk: Parquet's default dictionary encoding of the float
    # columns took 78 ms per write (and grew the file); without it, 14 ms. lz4: embeddings
    # barely compress, and zstd took 2.7x as long as lz4.
    pq.write_table(table, sink, compression="lz4", use_dictionary=False, write_statistics=False)
    return sink.getvalue()
