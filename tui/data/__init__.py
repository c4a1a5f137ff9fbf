"""The TUI's data layer: reads run directories through expman's reader and schema, off the UI thread."""
