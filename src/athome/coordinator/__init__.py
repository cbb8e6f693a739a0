"""athome.coordinator"""
