"""The trainer's side of fl-sidecar: everything a training program imports.

- :mod:`~fl_sidecar.trainer.client`: :class:`SidecarClient`, the gRPC client of the sidecar;
- :mod:`~fl_sidecar.trainer.connection`: its channel, settings and call plumbing;
- :mod:`~fl_sidecar.trainer.downloads`, :mod:`~fl_sidecar.trainer.uploads`,
  :mod:`~fl_sidecar.trainer.codec_calls`: model downloads, uploads (and the upload
  journal), pack/unpack through the sidecar;
- :mod:`~fl_sidecar.trainer.streams`: chunking, request streams, atomic file writes;
- :mod:`~fl_sidecar.trainer.events`: :class:`EventStream`, a ``WatchEvents`` subscription;
- :mod:`~fl_sidecar.trainer.results`: the calls' result dataclasses;
- :mod:`~fl_sidecar.trainer.credentials`: :class:`CallCredentials`;
- :mod:`~fl_sidecar.trainer.interceptor`: the one gRPC interceptor (token, socket
  check, typed errors) and :mod:`~fl_sidecar.trainer.remote_errors`, the typed
  errors it raises;
- :mod:`~fl_sidecar.trainer.compat`: the reference client's ``Communication``.

Where the sidecar is comes from :mod:`fl_sidecar.address`. ``fl_sidecar.client``
and ``fl_sidecar.compat`` re-export these names at their old paths. Importing this
package itself loads nothing (no grpc).
"""
