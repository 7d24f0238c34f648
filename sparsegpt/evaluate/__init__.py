"""Stage step 3, evaluation: perplexity split over the ranks and the runners of the evaluation hooks."""
