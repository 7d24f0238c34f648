"""What a run is asked to do: the recipe schema (`settings`), the whole recipe (`recipe`) and the evaluation
hook registry (`hooks`). Light: imports neither torch nor transformers, so recipes validate in milliseconds."""
