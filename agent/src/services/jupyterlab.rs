//! JupyterLab: a pinned venv under /opt, configured for the UAP, probed on `GET /api`.
