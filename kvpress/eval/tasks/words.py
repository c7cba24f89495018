"""Small built-in word lists (written for kvpress) used to make keys, distractors and word-list tasks."""

from __future__ import annotations

ADJECTIVES = """
able ancient angry bold brave bright broken busy calm careful cheap clean clever cold cool crazy curious
damp dark dear deep dizzy dry eager early easy empty fair famous fancy fast fierce flat fresh friendly
gentle giant glad golden grand green happy hard heavy hollow honest huge humble hungry icy jolly kind
large lazy light little lively lonely loud lucky mad massive mighty modern narrow neat nervous new noble
odd old orange pale plain polite poor proud purple quick quiet rapid rare red rich rough round royal
rusty sad salty scary sharp shiny short shy silent silly simple slow small smooth soft solid sour spicy
steep sticky strange strong sunny sweet swift tall tame tender thick thin tiny tired tough ugly vast
warm weak wet wide wild windy wise witty young zany
""".split()

NOUNS = """
anchor apple arrow badge banana basket beach bell bicycle blanket boat bottle bread bridge brush bucket
button cabin cable camera candle canoe carpet castle cat chair cherry circle cloud clock coat coin comet
cookie copper cotton crayon crown cup curtain desk diamond dinosaur dolphin door dragon drum eagle engine
feather fence finger flag flower forest fountain fox garden gate ghost glove goat guitar hammer harbor hat
helmet hill honey horse island jacket jar jewel kettle key kite ladder lamp lantern leaf lemon letter lion
lizard magnet mango map marble meadow mirror monkey moon mountain mouse needle nest ocean orchard otter owl
paddle painting panda parrot peach pencil pepper piano pillow pirate planet pocket pond potato puzzle
rabbit radio rainbow river robot rocket saddle sail sandwich scarf shell ship shoe shovel signal silver
spoon squirrel stamp star statue stone storm sugar sword table teapot tiger tomato tower train tree
trumpet tulip turtle umbrella valley violin wagon wallet whale whistle window wizard wolf yacht zebra
""".split()

# Everyday English words for the common-words task; disjoint from the key words above is not required.
COMMON_WORDS = """
about above across act add afraid after again age ago agree air all allow almost alone along already
also always among amount animal answer any appear area arm army around arrive art ask atom aunt autumn
baby back bad bag ball band bank bar base basic battle bear beat beauty bed before begin behind believe
below best better between big bird bit black blood blow blue board body bone book born both bottom box
boy branch break bring brother brown build burn business buy call camp can capital captain car card care
carry case catch cause cell cent center century certain chance change character charge chart check chick
chief child choose chord church city claim class clear climb close clothe coast cold collect colony color
column come common company compare complete condition connect consider contain continue control corn
corner correct cost count country course cover cow create crop cross crowd current cut dance danger
day dead deal death decide decimal degree depend describe design determine develop dictionary die
differ difficult direct discuss distant divide doctor dog dollar done double down draw dream dress drink
drive drop duck during dust each ear earth east eat edge effect egg eight either electric element else
end enemy energy enough enter equal equate especially even evening event ever every exact example except
excite exercise expect experience experiment eye face fact fall family far farm father fear feed feel
few field fight figure fill final find fine fire first fish fit five floor flow fly follow food foot
force form found four free friend front fruit full fun game gas gather general get gift girl give glass
go gold good got govern grass gray great ground group grow guess guide gun hair half hand happen hat have
head hear heart heat help here high history hold hole home hope horse hot hour house hunt hurry ice idea
inch include industry insect instant instrument interest invent iron job join joy jump keep kill king
kitchen knew know lady lake land language last late laugh law lay lead learn least leave left leg length
less level lie life lift line liquid list listen live locate log long look lost lot love low machine
main major make man many mark market mass master match material matter meat meet melody metal method
middle might mile milk mind mine minute miss mix molecule money month more morning most mother motion
move much music must name nation natural nature near neck need neighbor never night nine noise none noon
north nose note nothing notice noun now number numeral object observe occur ocean offer office often oil
once one open operate opposite order organ original other oxygen page paint pair paper paragraph parent
part particular party pass past path pattern pay people perhaps period person phrase pick picture piece
pitch place plan plane plant play please plural poem point pose position possible post pound power
practice prepare present press pretty print probable problem process produce product proper property
protect prove provide pull push put question quite quotient race rail rain raise range reach read ready
real reason receive record region remember repeat reply represent require rest result ride right ring
rise road rock roll room root rope rose row rub rule run safe sail salt same sand save say scale school
science score sea search season seat second section see seed seem segment select self sell send sense
sentence separate serve set settle seven several shape share sharp sheet shine shop shore should shoulder
shout show side sight sign silent similar since sing single sister sit six size skill skin sky sleep
slip smell smile snow soil soldier solution solve son song soon sound south space speak special speech
speed spell spend spoke spot spread spring square stand start state station stay stead steam steel step
stick still stood stop store story straight stream street stretch string student study subject substance
subtract success suffix suggest suit summer supply support sure surface surprise swim syllable symbol
system take talk teach team teeth tell temperature ten term test thank thick thing think third thought
thousand three through throw thus tie time tire together told tone took tool top total touch toward town
track trade travel trip trouble truck true try tube turn twenty type uncle under unit until use usual
valley value vary verb very view village visit voice vowel wait walk wall want war wash watch water wave
way wear weather week weight well west wheel where while white whole wife win wind wing winter wire wish
woman wonder wood word work world write wrong yard year yellow yes yet young
""".split()
