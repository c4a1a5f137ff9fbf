"""Run directories back as Arrow tables: Run, artifacts, notebook views."""
