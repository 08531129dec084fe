"""Recall: memorised texts as conversations and questions, asking a memorised model, and scoring its answers."""
