"""Purchase intent: the features of a user's open session and the model that scores them.

Engine-independent and free of scikit-learn: the flow (`operators.intent_logic`)
and the training command (`app.intent`) both compute features with
`features.IntentState`, and serving scores them with `model.IntentModel`, plain
Python over the trees exported to arrays.
"""
