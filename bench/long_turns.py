"""The hand-written turns that `bench.long_set` composes into long conversations.

Written for this evaluation only, apart from every training file under config/data
(which holds short, clean one-sentence requests): here the voices are a terse
lowercase texter, a wordy formal writer, a non-native speaker and a rambler, and
the requests carry the detail of real chats. Planned before writing:

  personas   Dana (night-shift nurse, texts in lowercase), Mr. Okafor (retired
             engineer, formal, long sentences), Lucía (ESL, small grammar slips),
             Theo (student, rambles with asides)
  topics     per intent label, six decisive requests across the personas, on
             subjects the training file does not use (shift swaps, pension
             forms, a choir, a bakery, a thesis, a boat licence, ...)
  positions  start, middle, end, after long small talk, appended to an old
             thread (bench.long_set places each decisive turn in each)

The decisive turns are indexed: 0-3 may be used to choose the pooling rule,
4-5 are held out and never used for a choice (bench.long reports them apart).
"""

from __future__ import annotations

DECISIVE: dict[str, list[str]] = {
    "rag_query": [
        "ok real question now. whats the shift swap rule in the staff handbook, like how many days notice does it say we need? pls check the actual doc",
        "I should be grateful if you would consult the pension scheme booklet and tell me precisely what it states regarding early withdrawal before the age of sixty.",
        "Please, can you search in the company knowledge base which form I must use for the travel reimbursement? I not find it in the intranet.",
        "so can you pull up what the library's policy page says about renewing a loan more than twice, i swear it changed and i need the exact wording",
        "one more thing, look up in the ward protocol doc what the max interval is between obs checks for post-op patients. dont guess, quote it",
        "Kindly locate, in the manual for the heat pump, the section describing the defrost cycle, and tell me what it says about the error code E7.",
    ],
    "professional": [
        "anyway the real reason im writing: my manager wants me to lead the new rota planning meeting on monday and i have no idea how to run it without people fighting over weekends",
        "My former employer has asked me to return for a six-month consultancy on their pumping station refit. I must draft a proposal with a day rate and scope by Thursday. How should I structure it?",
        "I have a problem at my job. My colleague presents my analysis in the meeting as his work, two times now. How I can tell to my boss without to create drama?",
        "ok so the thing i actually need help with: my internship supervisor wants a written project status update every friday and mine keep getting sent back as too vague",
        "real talk tho, the charge nurse keeps giving me the worst assignments and i want to raise it with HR before my contract renewal. how do i word that email",
        "I am negotiating the terms of a part-time board position with a local water cooperative. They offered a stipend I consider low; how might I counter without appearing difficult?",
    ],
    "psychological": [
        "honestly lately i cant switch off after shifts, i lie awake replaying every call and my heart races. is this burnout or something worse, and what can i do about it",
        "Since my wife passed, I find that I cannot concentrate on anything for more than a few minutes and I avoid seeing people. I wonder whether I ought to speak to someone professionally.",
        "I have this anxiety every time the phone ring, my chest become tight and I cannot answer. It is like this since months. How I can work on this?",
        "so i think i have some kind of perfectionism problem? like i rewrite one paragraph for three hours and then feel like garbage and skip class. how do people get out of that loop",
        "therapist asked me to journal about what triggers the panic and i keep avoiding it. why would my brain fight the thing thats supposed to help",
        "I have noticed a pattern in which I become irritable and withdrawn every winter, and it lifts in spring. Is there a recognised explanation for this and what is usually recommended?",
    ],
    "learning": [
        "ok question: can you explain how beta blockers actually lower heart rate? like the mechanism, our pharm refresher glossed over it",
        "I have taken up an evening course in celestial navigation. Could you explain, step by step, how one computes a position line from a sextant sight of the sun?",
        "I study for the B2 exam in English. Can you explain me when to use present perfect and when past simple? I always mix them.",
        "so my thesis needs a regression with interaction terms and i genuinely do not get how to interpret the coefficient of the interaction, can you walk me through it",
        "trying to learn excel pivot tables for the staffing sheet, can u teach me from zero how to group by week",
        "For the boat licence examination I must understand the rules for lights on vessels at night. Would you explain which lights a sailing vessel under way must show?",
    ],
    "social": [
        "ok so my sister is getting married and wants me as maid of honour but we havent really talked in two years. how do i handle the speech and the whole reconnecting thing",
        "My grandson has not visited in many months and my son says he is simply busy. I should like to invite him without seeming to reproach him. What would you suggest?",
        "My neighbours invite me always to their barbecues and I never invite them back because my flat is very small. How I can return the kindness?",
        "so my roommate keeps having her boyfriend stay over like five nights a week and he doesnt pay rent. how do i bring it up without making it a whole thing",
        "my friend group has a group chat where they plan stuff and i just found out theres a second one without me. should i say something or let it go",
        "I have been asked to organise the annual reunion of my engineering class, some fifty people. How should I go about getting them to reply and actually attend?",
    ],
    "emotional": [
        "sorry i just need to vent. a patient i had for weeks died tonight and i held it together on the ward but now im in my car crying and i feel so empty",
        "I must confess I am rather overjoyed this evening: my daughter telephoned to say I am to become a grandfather for the first time. I hardly know what to do with myself.",
        "Today I received the letter that my visa is refused. I am so sad and angry, I worked two years for this. I don't know what to feel.",
        "i just got my exam back and i FAILED it. after all those nights. i feel so stupid and i cant stop shaking",
        "im honestly so lonely tonight. everyone at home is asleep when i get back and i eat dinner alone at 3am every day",
        "I find myself quite furious: the council has felled the old oak outside my window without any notice, the tree my late wife planted. I am beside myself.",
    ],
    "aspirational": [
        "big picture question: i want to go from bedside nursing to nurse practitioner in the next five years. what would a realistic plan look like while still working nights",
        "It has long been my ambition to sail single-handed to the Azores before I turn seventy-five. How would you suggest I plan the next three years towards that goal?",
        "My dream is to open a small bakery with bread from my country. I have some savings. What steps I should plan for the next two years?",
        "i want to eventually do a phd abroad, like in the netherlands or denmark, and i want to map out what i need to do from now until applications",
        "someday i want to run a marathon, like an actual full one, and i want a long term plan because right now i can barely run 5k",
        "Before I am too old I should like to write and publish a history of the village where I grew up. How would I set about such a long project?",
    ],
}

# Small talk from the user, in the same four voices.
SMALL_TALK_USER: list[str] = [
    "hey! how are you doing today",
    "Good evening. I trust you are keeping well.",
    "Hello, how are you? Here it is raining whole day.",
    "hiii ok so my day has been weird, the bus broke down and we all had to walk the last bit, anyway",
    "lol the cafeteria had actual pancakes today, like real ones, a miracle",
    "The weather has turned rather autumnal here; I spent the afternoon raking leaves, which I find oddly satisfying.",
    "I just came back from the market, the tomatoes are so good this season, I buy too many.",
    "my cat knocked a whole plant off the shelf at 5am so im running on coffee and spite",
    "Did you know the swallows have already left? My late father always said that meant an early winter.",
    "I watched a very funny film yesterday with my cousin, we laughed so much.",
    "ok random but do you have a favourite season? i think mine is early summer",
    "I have been re-reading some old letters this week; remarkable how handwriting changes over fifty years.",
    "haha yeah. anyway the game last night was insane, overtime and everything",
    "In my city there is festival this week, with music in the streets until late.",
    "I am told it will be sunny at the weekend, though I shall believe it when I see it.",
    "so i tried making sourdough and it came out like a brick lol",
    "Thank you for asking. My knee is a little better, I walked to the post office today.",
    "my neighbour is learning the trumpet. at 8am. every day.",
    "This morning I see a fox in the park, very close, it was beautiful.",
    "brb grabbing tea. ok back. where were we",
    "I must say the new bus timetable is an improvement, though the shelters remain draughty.",
    "anyway enough about me lol, hows your day going",
]

# Small talk from the assistant.
SMALL_TALK_ASSISTANT: list[str] = [
    "I'm doing well, thanks for asking! How has your day been so far?",
    "That sounds like quite a day. I hope things settle down this evening.",
    "Ha, that's a nice surprise. Little things like that can really change the mood of a day.",
    "Rainy days can be cosy if you don't have to go out. Do you have plans for the evening?",
    "That's lovely to hear. Seasonal food really does taste better.",
    "Oh no, poor plant! Cats seem to have a special talent for early-morning chaos.",
    "Folk wisdom about birds and weather is fascinating; sometimes it turns out to be surprisingly accurate.",
    "A good laugh with family is hard to beat. What was the film?",
    "Early summer is a great choice: long evenings without the worst of the heat.",
    "Old letters are a wonderful window into the past. It must bring back a lot of memories.",
    "Overtime games are the best to watch, even if they are hard on the nerves!",
    "Street festivals are such fun. I hope the weather holds for it.",
    "Sourdough takes a few tries for almost everyone. The starter and the proofing time make a big difference.",
    "I'm glad the knee is improving. Short walks are a good way to build back up.",
    "Seeing a fox up close is a real treat. They are usually so shy.",
    "No problem, take your time. I'm here whenever you're ready.",
]

# Old threads: an earlier exchange, resolved, to which a new request is later appended.
OLD_THREADS: list[list[tuple[str, str]]] = [
    [
        ("user", "hi my parcel tracking has said 'in transit' for six days, order ending 4471"),
        (
            "assistant",
            "Sorry to hear that. Parcels sometimes stop updating at a sorting hub. I'd suggest waiting one more working day and then contacting the carrier with the tracking number.",
        ),
        ("user", "ok it just updated, out for delivery now"),
        ("assistant", "Great news! It should arrive today then."),
        ("user", "got it, all good. thanks"),
        ("assistant", "You're welcome. Enjoy your delivery!"),
    ],
    [
        (
            "user",
            "Good morning. My reading lamp flickers whenever the refrigerator starts. Is this a cause for concern?",
        ),
        (
            "assistant",
            "A brief flicker when a large motor starts is common: the compressor draws a surge of current. If the flicker is strong or the lamp shares a circuit with the fridge, an electrician can check the wiring.",
        ),
        (
            "user",
            "They are indeed on the same circuit. I moved the lamp to another socket and the flickering has ceased.",
        ),
        ("assistant", "That confirms it. Keeping them on separate circuits is a sensible fix."),
        ("user", "Much obliged. That will be all for now."),
        ("assistant", "My pleasure. Have a pleasant day."),
    ],
    [
        ("user", "Hello, I try to change my password but the email with the code never arrive."),
        (
            "assistant",
            "Please check the spam folder first. If it isn't there, wait a few minutes and request a new code; only the latest code works.",
        ),
        ("user", "Ah yes, it was in spam. Now it works, I have new password."),
        (
            "assistant",
            "Perfect. You may want to mark the sender as safe so future emails arrive in your inbox.",
        ),
        ("user", "Ok I did it. Thank you very much."),
        ("assistant", "You're welcome! Let me know if anything else comes up."),
    ],
    [
        (
            "user",
            "ok so my laptop fan sounds like a jet engine whenever i open more than like 3 tabs",
        ),
        (
            "assistant",
            "That usually means the CPU is working hard or the fan is clogged with dust. Check the task manager for a process using a lot of CPU, and consider cleaning the vents with compressed air.",
        ),
        ("user", "there was some updater thing eating 60 percent cpu, killed it, silence"),
        (
            "assistant",
            "Nice detective work. If the updater comes back, let it finish once while plugged in; it usually calms down afterwards.",
        ),
        ("user", "cool cool. ty"),
        ("assistant", "Anytime!"),
    ],
]

# Assistant replies to a decisive request (generic: they answer without naming the subject).
ACKNOWLEDGE: list[str] = [
    "Thanks for telling me. Let me think about this carefully and give you something useful. There are a few parts to it, so I'll go through them one by one, and you can tell me which ones matter most to you.",
    "That's a good question, and it deserves a proper answer rather than a quick one. Let me lay out what I know and where I'd be careful, and then we can go deeper on whatever is most relevant for you.",
    "I hear you. Before I go into details, I want to make sure I understand the situation correctly, so tell me if I get anything wrong as I go along.",
]
