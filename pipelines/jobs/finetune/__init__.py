"""`pitome-export finetune`: distil the merged model from the unmerged one, then export it."""
