"""Importance-guided student initialization: a smaller Llama cut from the teacher."""
