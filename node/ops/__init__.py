"""Operations: what a node that runs for months needs beside its stages: retention, metrics,
the status page and health check on its HTTP port."""
