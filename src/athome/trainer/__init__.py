"""athome.trainer"""
