"""athome.peer"""
