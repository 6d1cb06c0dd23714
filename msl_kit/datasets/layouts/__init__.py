"""Readers of each dataset's official file layout: list files -> (path, class, split) records.
One module per family of layouts; `common` holds what they share."""
