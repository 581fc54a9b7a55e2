"""Scoring LIP predictions and presenting the scores.

* `prediction_files`: LIP challenge-format predictions (label PNGs, pose CSV)
  scored against a LIP release folder -> a report dict (JSON-ready).
* `report`: Markdown and HTML tables of a report dict.
* `overlay`: parsing masks and skeletons drawn over photos (PIL only).

The numbers themselves come from `nppnet_tf.metrics`.
"""
