"""athome.verification"""
