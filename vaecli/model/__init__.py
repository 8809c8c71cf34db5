"""Models: the family seam (`family`), plans (`plan`), checkpoint files (`checkpoint`, `hub`) and one package per
model family (`svd`)."""
