"""The run-directory contract: layout, schemas, record framing, rows, summaries, .expa objects, filesystems."""
