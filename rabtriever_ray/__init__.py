"""rabtriever-ray."""
