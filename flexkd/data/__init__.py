"""From raw rows to padded tensors, and the teacher-target cache that distill reads instead of the teacher."""
