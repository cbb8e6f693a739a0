"""athome.averaging"""
