"""Serving NPPNet with TF Serving: the graph, the wire formats, the checks.

* `module`: the serving graph (`ServingModule`: `serving_default` on
  encoded images, `dense_maps` on float batches).
* `reference`: the same predictions from the evaluation code (Keras side).
* `protocol`: gRPC request and response messages, warmup records.
* `rest`: REST request and response JSON.
* `samples`: deterministic sample photos.
* `ops`: the op types of a SavedModel (core TensorFlow only).
* `layout`: the export base (versions, models.config, metadata).
* `predictor`: predictions on image files (`nppnet predict`).
* `check`: `check_export`, what `nppnet serve-check` runs.

`nppnet_tf.export` writes the export; docs/serving.md describes it.
"""
