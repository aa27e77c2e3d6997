"""``nodule-pipeline serve``: the similar-nodule search page and its HTTP API."""
