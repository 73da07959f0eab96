"""The sidecar process's side: everything ``fl-sidecar serve`` runs.

- :mod:`~fl_sidecar.sidecar.process`: the ``serve`` process (gRPC server, socket, drain);
- :mod:`~fl_sidecar.sidecar.servicer`: the thin gRPC servicer,
  :mod:`~fl_sidecar.sidecar.status`: which error gives which gRPC status, and the error trailers,
  :mod:`~fl_sidecar.sidecar.codecstreams`: Pack and Unpack as message streams;
- :mod:`~fl_sidecar.sidecar.transfers`: the transfer layer the servicer calls (downloads,
  uploads, the FL server's other calls), :mod:`~fl_sidecar.sidecar.downloads`: a download
  handed to its call, :mod:`~fl_sidecar.sidecar.templates`: SAFETENSORS uploads' templates,
  :mod:`~fl_sidecar.sidecar.spool`: spool files and directories,
  :mod:`~fl_sidecar.sidecar.uploads`: the durable upload journal,
- :mod:`~fl_sidecar.sidecar.notifications`: the endpoint the FL server POSTs to,
  :mod:`~fl_sidecar.sidecar.eventbus`: the numbered events with replay and resume,
  :mod:`~fl_sidecar.sidecar.scripts`: compatibility mode (a training script per round);
- :mod:`~fl_sidecar.sidecar.settings`: the settings table, flags and environment (the
  parsers of their values: :mod:`~fl_sidecar.sidecar.values`);
  :mod:`~fl_sidecar.sidecar.socketdir`: who may own the unix socket and its directories;
  :mod:`~fl_sidecar.sidecar.telemetry`: Prometheus metrics and structured logs.

Importing this package imports none of them (no grpc until the process starts).
"""
