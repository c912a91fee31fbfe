"""Knowledge-distillation pipeline for image classifiers on Ray."""
