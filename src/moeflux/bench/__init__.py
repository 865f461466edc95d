"""The benchmark and correctness suite behind ``moeflux bench``, ``report``, ``demo`` and ``check``.

One module per concern:

* :mod:`~moeflux.bench.shapes`: layer shapes, their FLOP and byte counts, the presets.
* :mod:`~moeflux.bench.cases`: a shape's inputs on a device and its correctness reference.
* :mod:`~moeflux.bench.systems`: the adapter interface and the built-in systems;
  :mod:`~moeflux.bench.peers`: Hugging Face transformers' MoE block.
* :mod:`~moeflux.bench.calibrate`: this device's GEMM peak and copy bandwidth, measured in the run.
* :mod:`~moeflux.bench.timing`: timers, percentiles, memory, environment, the progress bar.
* :mod:`~moeflux.bench.metrics`: what each result column means.
* :mod:`~moeflux.bench.suite`: the bench and check loops; :mod:`~moeflux.bench.serve`: the
  request replay; :mod:`~moeflux.bench.coldstart`: first calls in fresh processes.
* :mod:`~moeflux.bench.results`, :mod:`~moeflux.bench.schema`: the result document, its
  Markdown and its JSON schema; :mod:`~moeflux.bench.plots`: ``moeflux report``'s PNGs.
"""
