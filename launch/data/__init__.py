"""Training data: where documents come from (`sources`), the offline tokenizers (`tokenizer`),
tokenize-pack-split (`build`) and the batch iterators over packed examples (`batches`)."""
