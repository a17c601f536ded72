"""Running the fleet on machines: the embedded servers, the worker launch
line, local workers, the `fleet workers` supervisor, deployment manifests and
putting a backlog into Postgres."""
