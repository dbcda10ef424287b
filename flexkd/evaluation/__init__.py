"""Task metrics of teacher and student: accuracy and macro-F1, ROUGE-L and perplexity, during and after training."""
